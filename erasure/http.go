package erasure

import (
	"errors"
	"net/http"
	"net/url"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/google/uuid"

	"github.com/analyticsd/analyticsd/api"
)

// Register mounts the erasure endpoints on r; admin is the auth middleware they require
// (analytics:admin):
//
//	DELETE /users/:user_id              erase one user's events; 202 with the job
//	DELETE /data?confirm=<tenant slug>  erase all of the tenant's data; 202 with the job
//	GET    /erasures/:id                the job's status
func (s *Service) Register(r fiber.Router, admin fiber.Handler) {
	r.Delete("/users/:user_id", admin, s.deleteUser)
	r.Delete("/data", admin, s.deleteTenantData)
	r.Get("/erasures/:id", admin, s.getJob)
}

func principal(c *fiber.Ctx) api.Principal {
	p, _ := api.PrincipalOf(c)
	return p
}

func (s *Service) deleteUser(c *fiber.Ctx) error {
	// c.Params is borrowed from fiber's buffer; PathUnescape returns a new string (or the error path
	// copies), so the id the job keeps is the caller's own.
	user, err := url.PathUnescape(c.Params("user_id"))
	if err != nil || user == "" || len(user) > 255 {
		return api.BadRequest("invalid_user_id", "user_id must be 1 to 255 bytes, percent-encoded in the path")
	}
	user = strings.Clone(user)
	p := principal(c)
	j, err := s.EraseUser(c.UserContext(), p.TenantID, user, p.Actor)
	if err != nil {
		return httpError(err)
	}
	return api.Respond(c, http.StatusAccepted, j)
}

// deleteTenantData erases everything the tenant stored. confirm must repeat the tenant's slug: an
// offboarding is not undone, and a script that sends DELETE /data by mistake must not start one.
func (s *Service) deleteTenantData(c *fiber.Ctx) error {
	p := principal(c)
	if c.Query("confirm") != p.Slug {
		return api.BadRequest("confirmation_required",
			"erasing all of a tenant's data cannot be undone: repeat the tenant's slug as confirm=<slug>")
	}
	j, err := s.EraseTenant(c.UserContext(), p.TenantID, p.Actor)
	if err != nil {
		return httpError(err)
	}
	return api.Respond(c, http.StatusAccepted, j)
}

func (s *Service) getJob(c *fiber.Ctx) error {
	id, err := uuid.Parse(c.Params("id"))
	if err != nil {
		return api.NotFound("erasure_not_found", "no erasure job has that id")
	}
	j, err := s.Get(c.UserContext(), principal(c).TenantID, id)
	if err != nil {
		return httpError(err)
	}
	return api.OK(c, j)
}

func httpError(err error) error {
	switch {
	case errors.Is(err, ErrNotFound):
		return api.NotFound("erasure_not_found", "no erasure job has that id")
	case errors.Is(err, ErrBadUserID):
		return api.BadRequest("invalid_user_id", err.Error())
	case errors.Is(err, ErrOlderInstances):
		return api.Conflict("instances_not_upgraded", err.Error(), 60)
	}
	return api.Unavailable("storage_unavailable", "the erasure could not be stored; retry shortly", 5, err)
}
