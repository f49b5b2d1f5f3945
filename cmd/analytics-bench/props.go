package main

import "strconv"

// Props builders: one per catalog entry, each a compact JSON object of about 100–300 bytes mixing
// repetitive values (plans, paths, user agents: these compress well) with random identifiers (these
// do not), as real product events do. Values never need JSON escaping.

var (
	plans      = []string{"free", "starter", "pro", "business", "enterprise"}
	countries  = []string{"US", "DE", "GB", "FR", "IN", "BR", "CA", "NL", "JP", "AU", "ES", "PL"}
	emailDoms  = []string{"gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me", "acme.io", "example.com", "fastmail.com"}
	browserUAs = []string{
		"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
		"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/125.0 Safari/537.36",
		"Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
		"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Version/17.5 Mobile/15E148 Safari/604.1",
		"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
	}
	sdkUAs      = []string{"sbh-python/2.3.1", "sbh-node/4.1.0", "sbh-go/1.8.2", "curl/8.5.0", "sbh-ruby/0.9.4", "PostmanRuntime/7.39.0"}
	apiPaths    = []string{"/v1/projects", "/v1/projects/{id}", "/v1/projects/{id}/builds", "/v1/builds/{id}", "/v1/files", "/v1/files/{id}/content", "/v1/users/me", "/v1/webhooks", "/v1/usage"}
	methods     = []string{"GET", "GET", "GET", "POST", "POST", "PATCH", "DELETE"}
	statuses    = []int{200, 200, 200, 200, 200, 201, 204, 400, 401, 404, 409, 422, 500}
	loginWays   = []string{"password", "password", "google", "github", "magic_link", "sso"}
	templates   = []string{"saas-starter", "landing-page", "blog", "crm", "dashboard", "ecommerce", "internal-tool", "api-service"}
	models      = []string{"gpt-4o-mini", "gpt-4o", "claude-3-5-sonnet", "llama-3.1-70b"}
	regions     = []string{"eu-west-1", "us-east-1", "us-west-2", "ap-southeast-1"}
	contentType = []string{"image/png", "image/jpeg", "application/pdf", "text/csv", "application/zip", "video/mp4"}
	extensions  = []string{"png", "jpg", "pdf", "csv", "zip", "mp4"}
	hookEvents  = []string{"build.completed", "build.failed", "user.created", "invoice.paid", "file.ready", "subscription.updated"}
	hookHosts   = []string{"hooks.slack.com", "api.zapier.com", "hooks.acme.io", "n8n.internal.example.com", "webhook.site"}
	hookErrors  = []string{"connect timeout after 10s", "HTTP 502 Bad Gateway", "HTTP 500 Internal Server Error", "TLS handshake failed", "HTTP 410 Gone"}
	emailTpls   = []string{"welcome", "password_reset", "verify_email", "build_ready", "invoice", "weekly_digest", "usage_alert"}
	mailErrors  = []string{"550 mailbox unavailable", "552 mailbox full", "bounce: address does not exist", "throttled by provider"}
	currencies  = []string{"usd", "eur", "gbp", "usd", "usd"}
	prices      = []int{900, 1900, 4900, 9900, 29900}
	cancelWhy   = []string{"too_expensive", "missing_features", "switched_service", "unused", "other"}
)

// obj appends a compact JSON object field by field.
type obj struct{ b []byte }

func (o *obj) key(k string) {
	if len(o.b) == 0 {
		o.b = append(o.b, '{')
	} else {
		o.b = append(o.b, ',')
	}
	o.b = append(o.b, '"')
	o.b = append(o.b, k...)
	o.b = append(o.b, '"', ':')
}

func (o *obj) str(k, v string) *obj {
	o.key(k)
	o.b = append(o.b, '"')
	o.b = append(o.b, v...)
	o.b = append(o.b, '"')
	return o
}

// hex writes prefix followed by n random hex digits.
func (o *obj) hex(k, prefix string, r *rng, n int) *obj {
	o.key(k)
	o.b = append(o.b, '"')
	o.b = append(o.b, prefix...)
	o.b = appendHex(o.b, r, n)
	o.b = append(o.b, '"')
	return o
}

func (o *obj) num(k string, v int) *obj {
	o.key(k)
	o.b = strconv.AppendInt(o.b, int64(v), 10)
	return o
}

func (o *obj) boolean(k string, v bool) *obj {
	o.key(k)
	o.b = strconv.AppendBool(o.b, v)
	return o
}

func (o *obj) done() []byte { return append(o.b, '}') }

func start(b []byte) *obj { return &obj{b: b[:0]} }

func apiPath(r *rng) string {
	p := r.of(apiPaths)
	out := make([]byte, 0, len(p)+8)
	for i := 0; i < len(p); i++ {
		if p[i] == '{' {
			out = strconv.AppendInt(out, int64(1000+r.intn(90000)), 10)
			i += 3 // skip "id}"
			continue
		}
		out = append(out, p[i])
	}
	return string(out)
}

func propsAPIRequest(r *rng, b []byte) []byte {
	return start(b).hex("key_prefix", "ak_", r, 12).str("method", r.of(methods)).str("path", apiPath(r)).
		num("status", statuses[r.intn(len(statuses))]).num("latency_ms", 3+r.intn(400)).
		num("bytes_out", 120+r.intn(24000)).str("user_agent", r.of(sdkUAs)).done()
}

func propsLogin(r *rng, b []byte) []byte {
	return start(b).str("method", r.of(loginWays)).boolean("mfa", r.intn(4) == 0).str("country", r.of(countries)).
		hex("session_id", "ses_", r, 20).str("user_agent", r.of(browserUAs)).done()
}

func propsRegistered(r *rng, b []byte) []byte {
	return start(b).str("email_domain", r.of(emailDoms)).str("plan", r.of(plans)).str("country", r.of(countries)).
		str("utm_source", r.of([]string{"google", "twitter", "newsletter", "producthunt", "direct"})).
		hex("invite_code", "inv_", r, 10).str("user_agent", r.of(browserUAs)).done()
}

func propsBuildStarted(r *rng, b []byte) []byte {
	return start(b).hex("build_id", "bld_", r, 16).num("project_id", 1000+r.intn(90000)).str("template", r.of(templates)).
		str("model", r.of(models)).num("prompt_tokens", 200+r.intn(6000)).str("region", r.of(regions)).done()
}

func propsBuildCompleted(r *rng, b []byte) []byte {
	return start(b).hex("build_id", "bld_", r, 16).num("project_id", 1000+r.intn(90000)).str("template", r.of(templates)).
		str("model", r.of(models)).num("duration_ms", 4000+r.intn(180000)).num("output_files", 3+r.intn(120)).
		num("completion_tokens", 500+r.intn(20000)).str("status", "success").done()
}

func propsFile(r *rng, b []byte) []byte {
	i := r.intn(len(contentType))
	return start(b).hex("file_id", "fil_", r, 16).str("content_type", contentType[i]).num("size_bytes", 2000+r.intn(40_000_000)).
		str("bucket", "uploads-"+r.of(regions)).
		str("path", "/projects/"+strconv.Itoa(1000+r.intn(90000))+"/assets/upload_"+strconv.Itoa(r.intn(100000))+"."+extensions[i]).done()
}

func propsRateLimited(r *rng, b []byte) []byte {
	return start(b).hex("key_prefix", "ak_", r, 12).str("path", apiPath(r)).num("limit", []int{60, 600, 1000, 5000}[r.intn(4)]).
		str("window", "1m").num("retry_after_s", 1+r.intn(60)).str("user_agent", r.of(sdkUAs)).done()
}

func webhook(r *rng, b []byte) *obj {
	return start(b).hex("webhook_id", "wh_", r, 12).str("endpoint", "https://"+r.of(hookHosts)+"/sbh/"+strconv.Itoa(r.intn(5000))).
		str("event_type", r.of(hookEvents)).num("attempt", 1+r.intn(3)).num("latency_ms", 20+r.intn(3000))
}

func propsWebhook(r *rng, b []byte) []byte { return webhook(r, b).num("status", 200).done() }

func propsWebhookFailed(r *rng, b []byte) []byte {
	return webhook(r, b).num("status", []int{0, 500, 502, 503, 410}[r.intn(5)]).str("error", r.of(hookErrors)).done()
}

func email(r *rng, b []byte) *obj {
	return start(b).str("template", r.of(emailTpls)).hex("message_id", "msg_", r, 24).
		str("provider", r.of([]string{"ses", "postmark", "sendgrid"})).str("to_domain", r.of(emailDoms))
}

func propsEmail(r *rng, b []byte) []byte {
	return email(r, b).num("size_bytes", 3000+r.intn(60000)).done()
}

func propsEmailFailed(r *rng, b []byte) []byte {
	return email(r, b).str("error", r.of(mailErrors)).done()
}

func propsCheckout(r *rng, b []byte) []byte {
	return start(b).hex("checkout_id", "cs_", r, 24).str("plan", r.of(plans[1:])).num("amount", prices[r.intn(len(prices))]).
		str("currency", r.of(currencies)).str("interval", r.of([]string{"month", "month", "year"})).done()
}

func subscription(r *rng, b []byte) *obj {
	return start(b).hex("subscription_id", "sub_", r, 20).hex("customer_id", "cus_", r, 14).str("plan", r.of(plans[1:])).
		num("amount", prices[r.intn(len(prices))]).str("currency", r.of(currencies))
}

func propsSubscription(r *rng, b []byte) []byte { return subscription(r, b).done() }

func propsSubscriptionCanceled(r *rng, b []byte) []byte {
	return subscription(r, b).str("reason", r.of(cancelWhy)).done()
}
