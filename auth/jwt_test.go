package auth_test

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/golang-jwt/jwt/v5"

	"github.com/analyticsd/analyticsd/api"
	"github.com/analyticsd/analyticsd/auth"
	"github.com/analyticsd/analyticsd/internal/testenv"
	"github.com/analyticsd/analyticsd/internal/testenv/fixture"
	"github.com/analyticsd/analyticsd/tenant"
)

// RS256 via a JWKS, side by side with HS256: each algorithm verifies only with its own key, so an
// HS256 token "signed" with the RSA public key (the classic confusion attack) is refused.
func TestJWTWithJWKSAndHS256(t *testing.T) {
	env := testenv.Migrated(t)
	fixture.Tenant(t, env.PG, "acme")
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{{
			"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
			"n": base64.RawURLEncoding.EncodeToString(priv.N.Bytes()),
			"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(priv.E)).Bytes()),
		}}})
	}))
	defer jwks.Close()
	secret := []byte("0123456789abcdef0123456789abcdef")
	authn := auth.NewAuthenticator(auth.NewKeys(env.PG), tenant.NewStore(env.PG),
		auth.JWTConfig{Secret: secret, JWKSURL: jwks.URL, Issuer: "host-app", Audience: "analytics"})
	app := api.NewApp(api.Config{}, nil)
	app.Get("/x", authn.Require(auth.ScopeAnalyticsRead), func(c *fiber.Ctx) error {
		p, _ := api.PrincipalOf(c)
		return c.SendString(p.Slug + " " + p.Actor)
	})
	claims := func(mod func(jwt.MapClaims)) jwt.MapClaims {
		c := jwt.MapClaims{"sub": "u1", "tenant": "acme", "role": "owner", "iss": "host-app", "aud": "analytics", "exp": time.Now().Add(time.Hour).Unix()}
		if mod != nil {
			mod(c)
		}
		return c
	}
	rs := func(c jwt.MapClaims, kid string) string {
		tok := jwt.NewWithClaims(jwt.SigningMethodRS256, c)
		tok.Header["kid"] = kid
		s, err := tok.SignedString(priv)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	hs := func(c jwt.MapClaims, key []byte) string {
		s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	pubDER := priv.PublicKey.N.Bytes()
	cases := []struct {
		name   string
		token  string
		status int
	}{
		{"RS256 from JWKS", rs(claims(nil), "k1"), 200},
		{"HS256 with the secret", hs(claims(nil), secret), 200},
		{"RS256 unknown kid", rs(claims(nil), "k2"), 401},
		{"HS256 signed with the RSA key material", hs(claims(nil), pubDER), 401},
		{"wrong issuer", rs(claims(func(c jwt.MapClaims) { c["iss"] = "evil" }), "k1"), 401},
		{"wrong audience", rs(claims(func(c jwt.MapClaims) { c["aud"] = "billing" }), "k1"), 401},
		{"expired", rs(claims(func(c jwt.MapClaims) { c["exp"] = time.Now().Add(-time.Hour).Unix() }), "k1"), 401},
		{"not yet valid", rs(claims(func(c jwt.MapClaims) { c["nbf"] = time.Now().Add(time.Hour).Unix() }), "k1"), 401},
		{"viewer", rs(claims(func(c jwt.MapClaims) { c["role"] = "viewer" }), "k1"), 403},
	}
	for _, tc := range cases {
		req := httptest.NewRequest(http.MethodGet, "/x", nil)
		req.Header.Set("Authorization", "Bearer "+tc.token)
		res, err := app.Test(req, -1)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != tc.status {
			t.Errorf("%s: got %d, want %d", tc.name, res.StatusCode, tc.status)
		}
	}
}

// A host app whose JWKS cannot be fetched is an outage: every token signed with a key not yet held is
// answered 503 (retry) until a fetch succeeds, the answer names nothing internal, and the outage is
// logged once, not per request (anyone can send such tokens). Before, the first was 401 carrying the
// fetch's error — AUTH_JWKS_URL, an internal address, in every client's hands — and the others, in
// the 30 s before the next fetch could start, 401 "no JWKS key with kid": each client dropped a
// valid token (both found by review).
func TestJWKSOutageIs503AndNamesNoInternalURL(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "down", http.StatusBadGateway)
	}))
	defer down.Close()
	authn := auth.NewAuthenticator(nil, nil, auth.JWTConfig{JWKSURL: down.URL + "/internal/jwks.json"})
	var logged strings.Builder
	authn.Log = slog.New(slog.NewTextHandler(&logged, nil))
	app := api.NewApp(api.Config{}, nil)
	app.Get("/x", authn.Require(auth.ScopeAnalyticsRead), func(c *fiber.Ctx) error { return c.SendString("ok") })
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{"sub": "u1", "tenant": "acme", "role": "owner", "exp": time.Now().Add(time.Hour).Unix()})
	tok.Header["kid"] = "k1"
	signed, err := tok.SignedString(priv)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		req := httptest.NewRequest(http.MethodGet, "/x", nil)
		req.Header.Set("Authorization", "Bearer "+signed)
		res, err := app.Test(req, -1)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 503 || res.Header.Get("Retry-After") == "" {
			t.Errorf("request %d while the JWKS cannot be fetched: %d (Retry-After %q) %s, want 503 with Retry-After",
				i+1, res.StatusCode, res.Header.Get("Retry-After"), body)
		}
		for _, internal := range []string{down.URL, "internal/jwks", "127.0.0.1", "502"} {
			if strings.Contains(string(body), internal) {
				t.Errorf("request %d: the answer names %q: %s", i+1, internal, body)
			}
		}
	}
	if n := strings.Count(logged.String(), "JWTs answered 503"); n != 1 {
		t.Errorf("the JWKS outage was logged %d times for 3 requests, want once:\n%s", n, logged.String())
	}
}
