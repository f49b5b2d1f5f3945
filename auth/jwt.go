package auth

import (
	"context"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// JWTConfig configures tokens issued by the host app. HS256 uses Secret; RS256 uses the keys
// published at JWKSURL. Either or both may be set; a token must use one of the configured algorithms
// (never "none", never RS/HS confusion).
type JWTConfig struct {
	Secret   []byte        // AUTH_JWT_SECRET
	JWKSURL  string        // AUTH_JWKS_URL
	Issuer   string        // AUTH_JWT_ISSUER: when set, iss must equal it
	Audience string        // AUTH_JWT_AUDIENCE: when set, aud must contain it
	Leeway   time.Duration // AUTH_JWT_LEEWAY: clock skew allowed on exp and nbf
}

// DefaultJWTConfig returns the documented defaults: no JWTs accepted until a secret or a JWKS URL is
// set, and 30 s of clock skew allowed once they are. (A zero Leeway allows none.)
func DefaultJWTConfig() JWTConfig { return JWTConfig{Leeway: 30 * time.Second} }

// Enabled reports whether any JWT verification is configured.
func (c JWTConfig) Enabled() bool { return len(c.Secret) > 0 || c.JWKSURL != "" }

// Claims are what analyticsd reads from a host-app token.
type Claims struct {
	jwt.RegisteredClaims
	Tenant string `json:"tenant"` // tenant slug
	Role   string `json:"role"`   // owner, admin, member, viewer
}

// roleScopes: owner and admin have full analytics access; member and viewer have none (docs/contract.md).
var roleScopes = map[string][]Scope{
	"owner":  AllScopes,
	"admin":  AllScopes,
	"member": nil,
	"viewer": nil,
}

type jwtVerifier struct {
	cfg    JWTConfig
	parser *jwt.Parser
	client *http.Client

	mu        sync.Mutex
	keys      map[string]*rsa.PublicKey
	fetched   time.Time
	lastTried time.Time
	lastErr   error         // the last fetch's error
	inflight  chan struct{} // closed when the fetch under way ends; nil when none is
}

func newJWTVerifier(cfg JWTConfig) *jwtVerifier {
	var methods []string
	if len(cfg.Secret) > 0 {
		methods = append(methods, "HS256")
	}
	if cfg.JWKSURL != "" {
		methods = append(methods, "RS256")
	}
	opts := []jwt.ParserOption{jwt.WithValidMethods(methods), jwt.WithExpirationRequired(), jwt.WithLeeway(cfg.Leeway)}
	if cfg.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(cfg.Issuer))
	}
	if cfg.Audience != "" {
		opts = append(opts, jwt.WithAudience(cfg.Audience))
	}
	return &jwtVerifier{cfg: cfg, parser: jwt.NewParser(opts...), client: &http.Client{Timeout: 5 * time.Second}}
}

// ErrInvalidToken: the JWT is malformed, expired, wrongly signed or lacks required claims.
var ErrInvalidToken = errors.New("invalid token")

// errJWKSUnavailable: the token names a key the set this process holds lacks, and the set could not
// be fetched. That is an outage (503), not the client's fault: answered as 401 with the fetch's error,
// it told every client the host app's internal AUTH_JWKS_URL, and made it discard a valid token
// (found by review). The detail goes to the log.
var errJWKSUnavailable = errors.New("the JWKS could not be fetched")

func (v *jwtVerifier) verify(ctx context.Context, token string) (*Claims, error) {
	var claims Claims
	_, err := v.parser.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) {
		switch t.Method.Alg() {
		case "HS256":
			return v.cfg.Secret, nil
		case "RS256":
			kid, _ := t.Header["kid"].(string)
			return v.rsaKey(ctx, kid)
		}
		return nil, fmt.Errorf("algorithm %s is not accepted", t.Method.Alg())
	})
	if err != nil {
		if errors.Is(err, errJWKSUnavailable) {
			return nil, err
		}
		if errors.Is(err, jwt.ErrTokenExpired) {
			return nil, fmt.Errorf("%w: expired", ErrInvalidToken)
		}
		return nil, fmt.Errorf("%w: %v", ErrInvalidToken, err)
	}
	if claims.Tenant == "" || claims.Subject == "" {
		return nil, fmt.Errorf("%w: the sub and tenant claims are required", ErrInvalidToken)
	}
	return &claims, nil
}

// rsaKey returns the JWKS key kid, refreshing the set every 10 minutes and on an unknown kid (at
// most every 30 s, so bogus kids cannot make us hammer the host app). The fetch runs without the
// lock: a token with a known kid never waits for it (a stale set is refreshed in the background),
// and only requests with an unknown kid wait for the fetch under way — a bogus kid once stalled
// every RS256 request for the fetch's 5 s.
func (v *jwtVerifier) rsaKey(ctx context.Context, kid string) (*rsa.PublicKey, error) {
	v.mu.Lock()
	key, ok := v.keys[kid]
	stale := time.Since(v.fetched) > 10*time.Minute
	if (!ok || stale) && v.inflight == nil && time.Since(v.lastTried) > 30*time.Second {
		v.lastTried = time.Now()
		v.inflight = make(chan struct{})
		go v.refresh(v.inflight)
	}
	wait, lastErr := v.inflight, v.lastErr
	v.mu.Unlock()
	if ok {
		return key, nil
	}
	if wait == nil && lastErr != nil {
		// The last fetch failed and the next may not start yet: the set held may lack this key
		// only because it could not be read. Answered 401 "no such kid", a client dropped a valid
		// token for the 30 s after each failed fetch (found by review).
		return nil, fmt.Errorf("%w: %w", errJWKSUnavailable, lastErr)
	}
	if wait != nil {
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: waiting for it: %w", errJWKSUnavailable, ctx.Err())
		}
		v.mu.Lock()
		key, ok = v.keys[kid]
		err := v.lastErr
		v.mu.Unlock()
		if ok {
			return key, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errJWKSUnavailable, err)
		}
	}
	return nil, fmt.Errorf("no JWKS key with kid %q", kid)
}

// refresh fetches the key set (bounded by the client's 5 s timeout), keeps it if the fetch worked,
// and closes done.
func (v *jwtVerifier) refresh(done chan struct{}) {
	keys, err := v.fetch(context.Background())
	v.mu.Lock()
	if err == nil {
		v.keys, v.fetched = keys, time.Now()
	}
	v.lastErr, v.inflight = err, nil
	v.mu.Unlock()
	close(done)
}

func (v *jwtVerifier) fetch(ctx context.Context) (map[string]*rsa.PublicKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, v.cfg.JWKSURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := v.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch JWKS: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch JWKS: %s", resp.Status)
	}
	var set struct {
		Keys []struct {
			Kty, Kid, Use, Alg, N, E string
		} `json:"keys"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(nil, resp.Body, 1<<20)).Decode(&set); err != nil {
		return nil, fmt.Errorf("decode JWKS: %w", err)
	}
	keys := map[string]*rsa.PublicKey{}
	for _, k := range set.Keys {
		if k.Kty != "RSA" || (k.Use != "" && k.Use != "sig") || (k.Alg != "" && k.Alg != "RS256") {
			continue
		}
		n, err1 := base64.RawURLEncoding.DecodeString(k.N)
		e, err2 := base64.RawURLEncoding.DecodeString(k.E)
		if err1 != nil || err2 != nil || len(e) > 4 {
			continue
		}
		eInt := int(new(big.Int).SetBytes(e).Int64())
		if eInt < 3 {
			continue
		}
		keys[k.Kid] = &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: eInt}
	}
	return keys, nil
}

func (c *Claims) scopes() []Scope { return roleScopes[c.Role] }
