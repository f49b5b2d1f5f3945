package auth

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// A token with an unknown kid makes the verifier fetch the key set again; while that fetch is slow,
// tokens with a known kid must still verify at once. (The code before held the key-set lock during
// the fetch: every RS256 request waited up to 5 s, each time a bogus kid was sent.)
func TestSlowJWKSFetchDoesNotStallKnownKeys(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	var fetches atomic.Int32
	jwks := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if fetches.Add(1) > 1 {
			time.Sleep(2 * time.Second) // the host app is slow now
		}
		json.NewEncoder(w).Encode(map[string]any{"keys": []map[string]string{{
			"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
			"n": base64.RawURLEncoding.EncodeToString(key.N.Bytes()),
			"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(key.E)).Bytes()),
		}}})
	}))
	defer jwks.Close()
	v := newJWTVerifier(JWTConfig{JWKSURL: jwks.URL})
	sign := func(kid string) string {
		tok := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims{"sub": "u", "tenant": "acme", "role": "admin", "exp": time.Now().Add(time.Hour).Unix()})
		tok.Header["kid"] = kid
		s, err := tok.SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ctx := context.Background()
	if _, err := v.verify(ctx, sign("k1")); err != nil {
		t.Fatalf("first verify: %v", err)
	}
	v.mu.Lock()
	v.lastTried = time.Time{} // as if 30 s had passed
	v.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if _, err := v.verify(ctx, sign("bogus")); err == nil {
			t.Error("a token with an unknown kid verified")
		}
	}()
	time.Sleep(100 * time.Millisecond) // the bogus kid's fetch is under way
	start := time.Now()
	if _, err := v.verify(ctx, sign("k1")); err != nil {
		t.Fatalf("known kid during the slow fetch: %v", err)
	}
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("a token with a known kid took %s while another kid's fetch ran, want no wait", took)
	}
	wg.Wait()
	if n := fetches.Load(); n != 2 {
		t.Errorf("%d fetches, want 2", n)
	}
}
