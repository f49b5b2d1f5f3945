package deploy_test

// Checks of the Kubernetes manifests in deploy/k8s: every document is decoded strictly into the
// Kubernetes API's own types (k8s.io/api), as the API server would — an unknown or misspelt field
// or a duplicate key fails — and then the wiring is checked: the spool volume per pod, the probes,
// the shutdown budget, the Secret and ConfigMap, the migrate Job. As for the compose file, the
// checks return their findings so TestK8sCatchesMistakes can prove each one fails.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

const k8sDir = "k8s"

// secretVars must come from the Secret: they carry passwords.
var secretVars = []string{"CLICKHOUSE_DSN", "POSTGRES_URL", "REDIS_URL"}

// k8sDecoder decodes the kinds deploy/k8s may hold, strictly: unknown fields, duplicate fields
// and fields in the wrong case are errors, as with `kubectl apply --validate=strict`.
var k8sDecoder = func() runtime.Decoder {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, batchv1.AddToScheme, policyv1.AddToScheme} {
		if err := add(scheme); err != nil {
			panic(err)
		}
	}
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
}()

// manifest is one decoded document and where it came from.
type manifest struct {
	file string // relative to deploy/k8s
	obj  runtime.Object
}

// readManifests reads every .yaml file under deploy/k8s, by path relative to it.
func readManifests(t *testing.T) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir(k8sDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if ext := filepath.Ext(path); ext != ".yaml" && ext != ".yml" {
			return fmt.Errorf("%s: only YAML manifests belong in deploy/k8s", path)
		}
		raw, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(k8sDir, path)
		out[filepath.ToSlash(rel)] = raw
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) == 0 {
		t.Fatal("deploy/k8s holds no manifests")
	}
	return out
}

// decodeManifests splits each file into its documents and decodes each strictly.
func decodeManifests(files map[string][]byte) ([]manifest, problems) {
	var out []manifest
	var bad problems
	for _, name := range slices.Sorted(maps.Keys(files)) {
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(files[name])))
		n := 0
		for {
			doc, err := r.Read()
			if err == io.EOF {
				break
			}
			if err != nil {
				bad.add("%s: %v", name, err)
				break
			}
			if len(bytes.TrimSpace(stripComments(doc))) == 0 {
				continue
			}
			n++
			obj, gvk, err := k8sDecoder.Decode(doc, nil, nil)
			if err != nil {
				bad.add("%s: document %d (%v): %v", name, n, gvk, err)
				continue
			}
			out = append(out, manifest{name, obj})
		}
		if n == 0 {
			bad.add("%s: no documents", name)
		}
	}
	return out, bad
}

func stripComments(doc []byte) []byte {
	var keep [][]byte
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(line), []byte("#")) {
			keep = append(keep, line)
		}
	}
	return bytes.Join(keep, []byte("\n"))
}

// installed is what `kubectl apply -f deploy/k8s/` creates (the top directory; ops/ holds Jobs
// run by hand).
type installed struct {
	sts       *appsv1.StatefulSet
	migrate   *batchv1.Job
	config    *corev1.ConfigMap
	services  []*corev1.Service
	pdb       *policyv1.PodDisruptionBudget
	opsJobs   []*batchv1.Job
	wrongKind []string
}

func sortManifests(ms []manifest) installed {
	var in installed
	for _, m := range ms {
		top := !strings.Contains(m.file, "/")
		switch o := m.obj.(type) {
		case *appsv1.StatefulSet:
			if top && in.sts == nil {
				in.sts = o
				continue
			}
		case *batchv1.Job:
			if !top {
				in.opsJobs = append(in.opsJobs, o)
				continue
			}
			if in.migrate == nil {
				in.migrate = o
				continue
			}
		case *corev1.ConfigMap:
			if top && in.config == nil {
				in.config = o
				continue
			}
		case *corev1.Service:
			if top {
				in.services = append(in.services, o)
				continue
			}
		case *policyv1.PodDisruptionBudget:
			if top && in.pdb == nil {
				in.pdb = o
				continue
			}
		}
		in.wrongKind = append(in.wrongKind, fmt.Sprintf("%s: %T", m.file, m.obj))
	}
	return in
}

func checkK8s(ms []manifest, known map[string]bool) problems {
	var bad problems
	in := sortManifests(ms)
	for _, w := range in.wrongKind {
		bad.add("unexpected object %s (one StatefulSet, one migrate Job, one ConfigMap, Services and a PodDisruptionBudget at the top; Jobs in ops/)", w)
	}
	if in.sts == nil || in.migrate == nil || in.config == nil || in.pdb == nil || len(in.services) != 2 {
		bad.add("want a StatefulSet, a migrate Job, a ConfigMap, a PodDisruptionBudget and 2 Services; got %v, %v, %v, %v, %d",
			in.sts != nil, in.migrate != nil, in.config != nil, in.pdb != nil, len(in.services))
		return bad
	}
	cfg := in.config.Data
	for k := range cfg {
		if !known[k] {
			bad.add("ConfigMap %s: %s is not a variable analyticsd reads", in.config.Name, k)
		}
		if slices.Contains(secretVars, k) || strings.HasSuffix(k, "_SECRET") {
			bad.add("ConfigMap %s: %s carries a secret; it belongs in the Secret", in.config.Name, k)
		}
	}
	if cfg["CLICKHOUSE_CLUSTER"] == "" {
		bad.add("ConfigMap: CLICKHOUSE_CLUSTER is not set; analyticsd would run single-server DDL on a cluster")
	}
	if !isTrue(cfg["REDIS_CLUSTER"]) {
		bad.add("ConfigMap: REDIS_CLUSTER=%q, want true (the manifests are for a Redis Cluster)", cfg["REDIS_CLUSTER"])
	}

	pod := in.sts.Spec.Template.Spec
	c := container(pod, &bad, "StatefulSet "+in.sts.Name)
	if c == nil {
		return bad
	}
	if !slices.Equal(c.Args, []string{"serve"}) || len(c.Command) != 0 {
		bad.add("StatefulSet: runs %v %v, want args [serve] (the image's entrypoint is /analyticsd)", c.Command, c.Args)
	}
	checkEnv("StatefulSet", *c, in.config.Name, known, &bad)
	checkSecurity("StatefulSet", pod, *c, &bad)
	checkResources("StatefulSet", *c, &bad)
	checkSpoolClaim(in.sts, *c, cfg, &bad)
	checkProbes(*c, cfg, &bad)
	checkShutdown(pod, *c, cfg, &bad)
	if r := in.sts.Spec.Replicas; r == nil || *r < 2 {
		bad.add("StatefulSet: replicas %v, want at least 2", r)
	}
	labels := in.sts.Spec.Template.Labels
	if sel := in.sts.Spec.Selector; sel == nil || !matches(sel.MatchLabels, labels) {
		bad.add("StatefulSet: selector does not match its pod labels")
	}
	checkServices(in, *c, &bad)
	checkPDB(in, &bad)
	checkMigrate(in, *c, known, &bad)
	for _, j := range in.opsJobs {
		checkDrainJob(j, *c, cfg, known, &bad)
	}
	return bad
}

func container(pod corev1.PodSpec, bad *problems, where string) *corev1.Container {
	if len(pod.Containers) != 1 {
		bad.add("%s: %d containers, want 1", where, len(pod.Containers))
		return nil
	}
	return &pod.Containers[0]
}

func matches(selector, labels map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// Every variable is one analyticsd reads, and the DSNs and URLs come from the Secret.
func checkEnv(where string, c corev1.Container, configMap string, known map[string]bool, bad *problems) {
	if len(c.EnvFrom) != 1 || c.EnvFrom[0].ConfigMapRef == nil || c.EnvFrom[0].ConfigMapRef.Name != configMap || c.EnvFrom[0].Prefix != "" {
		bad.add("%s: want envFrom the ConfigMap %s, without prefix", where, configMap)
	}
	fromSecret := map[string]bool{}
	for _, e := range c.Env {
		if !known[e.Name] {
			bad.add("%s: %s is not a variable analyticsd reads", where, e.Name)
		}
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			ref := e.ValueFrom.SecretKeyRef
			if ref.Key != e.Name {
				bad.add("%s: %s comes from Secret key %s; keep key and variable the same", where, e.Name, ref.Key)
			}
			fromSecret[e.Name] = ref.Optional == nil || !*ref.Optional
		}
	}
	for _, v := range secretVars {
		if !fromSecret[v] {
			bad.add("%s: %s must come from the Secret (secretKeyRef, not optional)", where, v)
		}
	}
}

func checkSecurity(where string, pod corev1.PodSpec, c corev1.Container, bad *problems) {
	psc, sc := pod.SecurityContext, c.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		bad.add("%s: the pod must run as non-root (runAsNonRoot, the image's user 65532)", where)
	}
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		bad.add("%s: the root file system must be read-only", where)
	}
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		bad.add("%s: allowPrivilegeEscalation must be false", where)
	}
	if sc == nil || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		bad.add("%s: capabilities must drop ALL", where)
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		bad.add("%s: automountServiceAccountToken must be false (analyticsd never calls the Kubernetes API)", where)
	}
}

func checkResources(where string, c corev1.Container, bad *problems) {
	req, lim := c.Resources.Requests, c.Resources.Limits
	if req.Cpu().IsZero() || req.Memory().IsZero() || lim.Memory().IsZero() {
		bad.add("%s: want cpu and memory requests and a memory limit", where)
	}
}

func addrPort(addr string) int {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return n
}

func namedPort(c corev1.Container, p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	return 0
}

// One claim per pod (volumeClaimTemplates) mounted at ANALYTICS_SPOOL_DIR, large enough for
// INGEST_MAX_SPOOL_MB, kept when the StatefulSet shrinks or goes.
func checkSpoolClaim(sts *appsv1.StatefulSet, c corev1.Container, cfg map[string]string, bad *problems) {
	dir := cfg["ANALYTICS_SPOOL_DIR"]
	if dir == "" {
		bad.add("ConfigMap: ANALYTICS_SPOOL_DIR is not set; the spool would be under the read-only root")
	}
	var mount *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		if m.MountPath == dir {
			mount = &c.VolumeMounts[i]
		}
	}
	if mount == nil {
		bad.add("StatefulSet: nothing is mounted at the spool %s", dir)
		return
	}
	if mount.ReadOnly || mount.SubPath != "" {
		bad.add("StatefulSet: the spool mount must be writable and the whole volume")
	}
	for _, v := range sts.Spec.Template.Spec.Volumes {
		if v.Name == mount.Name {
			bad.add("StatefulSet: the spool %s is the pod volume %s, shared or lost with the pod; want a volumeClaimTemplate", dir, v.Name)
			return
		}
	}
	var claim *corev1.PersistentVolumeClaim
	for i, t := range sts.Spec.VolumeClaimTemplates {
		if t.Name == mount.Name {
			claim = &sts.Spec.VolumeClaimTemplates[i]
		}
	}
	if claim == nil {
		bad.add("StatefulSet: no volumeClaimTemplate %s for the spool mount", mount.Name)
		return
	}
	if !slices.Equal(claim.Spec.AccessModes, []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce}) && !slices.Equal(claim.Spec.AccessModes, []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOncePod}) {
		bad.add("StatefulSet: spool claim access modes %v, want ReadWriteOnce (one pod, a local flock)", claim.Spec.AccessModes)
	}
	mb := 8192
	if v := cfg["INGEST_MAX_SPOOL_MB"]; v != "" {
		mb, _ = strconv.Atoi(v)
	}
	need := resource.NewQuantity(int64(mb)<<20, resource.BinarySI)
	if got := claim.Spec.Resources.Requests[corev1.ResourceStorage]; got.Cmp(*need) <= 0 {
		bad.add("StatefulSet: spool claim of %s, want more than INGEST_MAX_SPOOL_MB (%s)", got.String(), need.String())
	}
	pol := sts.Spec.PersistentVolumeClaimRetentionPolicy
	if pol == nil || pol.WhenScaled != appsv1.RetainPersistentVolumeClaimRetentionPolicyType || pol.WhenDeleted != appsv1.RetainPersistentVolumeClaimRetentionPolicyType {
		bad.add("StatefulSet: spool claims must be retained when scaled down or deleted (they hold acknowledged events until drained)")
	}
}

// Liveness asks /healthz (is the process alive), readiness /readiness (are its dependencies), both
// on the API listener (ANALYTICS_ADDR); a startup probe, if any, asks /healthz.
func checkProbes(c corev1.Container, cfg map[string]string, bad *problems) {
	api := addrPort(cfg["ANALYTICS_ADDR"])
	if api == 0 {
		api = 8080
	}
	probe := func(name string, p *corev1.Probe, path string) {
		switch {
		case p == nil:
			bad.add("StatefulSet: no %s probe", name)
		case p.HTTPGet == nil:
			bad.add("StatefulSet: the %s probe is not an HTTP GET", name)
		case p.HTTPGet.Path != path:
			bad.add("StatefulSet: the %s probe asks %s, want %s", name, p.HTTPGet.Path, path)
		case int(namedPort(c, p.HTTPGet.Port)) != api:
			bad.add("StatefulSet: the %s probe asks port %s, want the API's %d (ANALYTICS_ADDR)", name, p.HTTPGet.Port.String(), api)
		}
	}
	probe("liveness", c.LivenessProbe, "/healthz")
	probe("readiness", c.ReadinessProbe, "/readiness")
	if c.StartupProbe != nil {
		probe("startup", c.StartupProbe, "/healthz")
	}
	if m := addrPort(cfg["ANALYTICS_METRICS_ADDR"]); m == 0 || !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.Name == "metrics" && int(p.ContainerPort) == m }) {
		bad.add("StatefulSet: container port \"metrics\" is not ANALYTICS_METRICS_ADDR %q", cfg["ANALYTICS_METRICS_ADDR"])
	}
}

// The kubelet waits for the preStop pause and then serve's whole shutdown (finish requests, flush
// ingest, close) before it kills the process.
func checkShutdown(pod corev1.PodSpec, c corev1.Container, cfg map[string]string, bad *problems) {
	shutdown := 30 * time.Second
	if v := cfg["ANALYTICS_SHUTDOWN_TIMEOUT"]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			bad.add("ConfigMap: ANALYTICS_SHUTDOWN_TIMEOUT=%q: %v", v, err)
		}
		shutdown = d
	}
	var pause time.Duration
	if c.Lifecycle != nil && c.Lifecycle.PreStop != nil {
		if c.Lifecycle.PreStop.Sleep == nil {
			bad.add("StatefulSet: preStop must be a sleep action (the image has no shell)")
		} else {
			pause = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
		}
	}
	const margin = 5 * time.Second
	grace := 30 * time.Second
	if pod.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	}
	if grace < pause+shutdown+margin {
		bad.add("StatefulSet: terminationGracePeriodSeconds %s is shorter than preStop %s + ANALYTICS_SHUTDOWN_TIMEOUT %s + %s: the ingest flush would be killed", grace, pause, shutdown, margin)
	}
}

func checkServices(in installed, c corev1.Container, bad *problems) {
	labels := in.sts.Spec.Template.Labels
	var headless, clusterIP *corev1.Service
	for _, s := range in.services {
		if !matches(s.Spec.Selector, labels) {
			bad.add("Service %s does not select the StatefulSet's pods", s.Name)
		}
		for _, p := range s.Spec.Ports {
			if namedPort(c, p.TargetPort) == 0 {
				bad.add("Service %s: target port %s is not a container port", s.Name, p.TargetPort.String())
			}
		}
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			headless = s
		} else if s.Spec.Type == "" || s.Spec.Type == corev1.ServiceTypeClusterIP {
			clusterIP = s
		}
	}
	if headless == nil || in.sts.Spec.ServiceName != headless.Name {
		bad.add("StatefulSet: serviceName %q must be the headless Service", in.sts.Spec.ServiceName)
	}
	if clusterIP == nil {
		bad.add("no ClusterIP Service for the API")
		return
	}
	for _, p := range clusterIP.Spec.Ports {
		if namedPort(c, p.TargetPort) != namedPort(c, intstr.FromString("http")) {
			bad.add("Service %s exposes port %s; only the API port belongs there (/metrics names every tenant)", clusterIP.Name, p.TargetPort.String())
		}
	}
}

func checkPDB(in installed, bad *problems) {
	p := in.pdb
	if p.Spec.Selector == nil || !matches(p.Spec.Selector.MatchLabels, in.sts.Spec.Template.Labels) {
		bad.add("PodDisruptionBudget %s does not select the StatefulSet's pods", p.Name)
	}
	switch {
	case p.Spec.MaxUnavailable != nil:
		if p.Spec.MaxUnavailable.Type == intstr.Int && p.Spec.MaxUnavailable.IntVal < 1 {
			bad.add("PodDisruptionBudget: maxUnavailable 0 blocks every node drain")
		}
	case p.Spec.MinAvailable != nil:
		if r := in.sts.Spec.Replicas; p.Spec.MinAvailable.Type == intstr.Int && r != nil && p.Spec.MinAvailable.IntVal >= *r {
			bad.add("PodDisruptionBudget: minAvailable %d of %d replicas blocks every node drain", p.Spec.MinAvailable.IntVal, *r)
		}
	default:
		bad.add("PodDisruptionBudget: neither maxUnavailable nor minAvailable")
	}
}

// The migrate Job runs `analyticsd migrate` with the StatefulSet's image and configuration.
func checkMigrate(in installed, api corev1.Container, known map[string]bool, bad *problems) {
	j := in.migrate
	pod := j.Spec.Template.Spec
	c := container(pod, bad, "Job "+j.Name)
	if c == nil {
		return
	}
	if !slices.Equal(c.Args, []string{"migrate"}) || len(c.Command) != 0 {
		bad.add("Job %s: runs %v %v, want args [migrate]", j.Name, c.Command, c.Args)
	}
	if c.Image != api.Image {
		bad.add("Job %s: image %s, the StatefulSet runs %s; migrate must be the release that serves", j.Name, c.Image, api.Image)
	}
	if !reflect.DeepEqual(c.Env, api.Env) || !reflect.DeepEqual(c.EnvFrom, api.EnvFrom) {
		bad.add("Job %s: its environment differs from the StatefulSet's; migrate must see the same configuration", j.Name)
	}
	checkEnv("Job "+j.Name, *c, in.config.Name, known, bad)
	checkSecurity("Job "+j.Name, pod, *c, bad)
	checkResources("Job "+j.Name, *c, bad)
	if pod.RestartPolicy != corev1.RestartPolicyNever && pod.RestartPolicy != corev1.RestartPolicyOnFailure {
		bad.add("Job %s: restartPolicy %q", j.Name, pod.RestartPolicy)
	}
	if j.Spec.BackoffLimit == nil || j.Spec.ActiveDeadlineSeconds == nil {
		bad.add("Job %s: want a backoffLimit and an activeDeadlineSeconds (ON CLUSTER DDL can wait on a server that is down)", j.Name)
	}
}

// A Job under ops/ that drains a retired pod's spool mounts a claim at ANALYTICS_SPOOL_DIR and
// runs `spool drain` with the StatefulSet's image.
func checkDrainJob(j *batchv1.Job, api corev1.Container, cfg map[string]string, known map[string]bool, bad *problems) {
	pod := j.Spec.Template.Spec
	c := container(pod, bad, "Job "+j.Name)
	if c == nil {
		return
	}
	if len(c.Args) < 2 || c.Args[0] != "spool" || c.Args[1] != "drain" {
		bad.add("ops Job %s: runs %v, want spool drain", j.Name, c.Args)
	}
	if c.Image != api.Image {
		bad.add("ops Job %s: image %s, the StatefulSet runs %s", j.Name, c.Image, api.Image)
	}
	for _, e := range c.Env {
		if !known[e.Name] {
			bad.add("ops Job %s: %s is not a variable analyticsd reads", j.Name, e.Name)
		}
	}
	checkSecurity("ops Job "+j.Name, pod, *c, bad)
	dir := cfg["ANALYTICS_SPOOL_DIR"]
	if i := slices.Index(c.Args, "--dir"); i >= 0 && i+1 < len(c.Args) {
		dir = c.Args[i+1]
	}
	for _, m := range c.VolumeMounts {
		if m.MountPath != dir {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name == m.Name && v.PersistentVolumeClaim != nil && strings.HasPrefix(v.PersistentVolumeClaim.ClaimName, "spool-analyticsd-") {
				return
			}
		}
	}
	bad.add("ops Job %s: no spool claim (spool-analyticsd-N) mounted at %s", j.Name, dir)
}

func TestK8sManifests(t *testing.T) {
	ms, bad := decodeManifests(readManifests(t))
	for _, msg := range bad {
		t.Error(msg)
	}
	for _, msg := range checkK8s(ms, knownConfigVars(t)) {
		t.Error(msg)
	}
}

// Every check fails on the mistake it is there for: each case breaks a copy of one manifest.
func TestK8sCatchesMistakes(t *testing.T) {
	files := readManifests(t)
	known := knownConfigVars(t)
	cases := []struct {
		name, file, old, new, want string
	}{
		{"a misspelt field", "statefulset.yaml", "podManagementPolicy:", "podManagmentPolicy:", `unknown field "spec.podManagmentPolicy"`},
		{"a field in the wrong case", "statefulset.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", `unknown field "spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem"`},
		{"a duplicate field", "pdb.yaml", "  maxUnavailable: 1\n", "  maxUnavailable: 1\n  maxUnavailable: 2\n", `key "maxUnavailable" already set`},
		{"a kind the manifests do not use", "pdb.yaml", "kind: PodDisruptionBudget", "kind: PodDisruptionBudgets", `no kind "PodDisruptionBudgets"`},
		{"liveness on another path", "statefulset.yaml", "path: /healthz\n              port: http\n            periodSeconds: 10", "path: /health\n              port: http\n            periodSeconds: 10", "the liveness probe asks /health, want /healthz"},
		{"readiness on /healthz", "statefulset.yaml", "path: /readiness", "path: /healthz", "the readiness probe asks /healthz, want /readiness"},
		{"readiness on the metrics port", "statefulset.yaml", "path: /readiness\n              port: http", "path: /readiness\n              port: metrics", "the readiness probe asks port metrics"},
		{"no volumeClaimTemplate for the spool", "statefulset.yaml", "    - metadata:\n        name: spool", "    - metadata:\n        name: data", "no volumeClaimTemplate spool"},
		{"the spool on an emptyDir", "statefulset.yaml", "        - name: tmp\n          emptyDir:", "        - name: spool\n          emptyDir: {}\n        - name: tmp\n          emptyDir:", "is the pod volume spool"},
		{"a spool claim smaller than INGEST_MAX_SPOOL_MB", "statefulset.yaml", "storage: 10Gi", "storage: 8Gi", "want more than INGEST_MAX_SPOOL_MB"},
		{"claims deleted on scale-down", "statefulset.yaml", "    whenScaled: Retain", "    whenScaled: Delete", "must be retained when scaled down"},
		{"a ConfigMap key analyticsd does not read", "configmap.yaml", "INGEST_MAX_SPOOL_MB:", "INGEST_MAX_SPOOL_MIB:", "INGEST_MAX_SPOOL_MIB is not a variable analyticsd reads"},
		{"a DSN in the ConfigMap", "configmap.yaml", "  LOG_FORMAT: json\n", "  LOG_FORMAT: json\n  POSTGRES_URL: postgres://analytics:pw@pg:5432/analytics\n", "POSTGRES_URL carries a secret"},
		{"no cluster name", "configmap.yaml", "CLICKHOUSE_CLUSTER: analytics_cluster", "CLICKHOUSE_CLUSTER: \"\"", "CLICKHOUSE_CLUSTER is not set"},
		{"an env variable analyticsd does not read", "statefulset.yaml", "- name: QUOTA_ALERT_WEBHOOK_SECRET", "- name: QUOTA_WEBHOOK_SECRET", "QUOTA_WEBHOOK_SECRET is not a variable analyticsd reads"},
		{"a grace period shorter than the flush", "statefulset.yaml", "terminationGracePeriodSeconds: 60", "terminationGracePeriodSeconds: 30", "the ingest flush would be killed"},
		{"root", "statefulset.yaml", "runAsNonRoot: true", "runAsNonRoot: false", "must run as non-root"},
		{"the Job runs serve", "migrate-job.yaml", `args: ["migrate"]`, `args: ["serve"]`, "want args [migrate]"},
		{"the Job runs another release", "migrate-job.yaml", "image: registry.example.com/analyticsd:1.0.0", "image: registry.example.com/analyticsd:0.9.0", "migrate must be the release that serves"},
		{"the Job misses a secret", "migrate-job.yaml", "            - name: REDIS_URL\n              valueFrom:\n                secretKeyRef:\n                  name: analyticsd-secrets\n                  key: REDIS_URL\n", "", "REDIS_URL must come from the Secret"},
		{"the API Service exposes /metrics", "services.yaml", "    - name: http\n      port: 8080\n      targetPort: http\n      protocol: TCP\n---", "    - name: http\n      port: 8080\n      targetPort: metrics\n      protocol: TCP\n---", "only the API port belongs there"},
		{"a PodDisruptionBudget that blocks drains", "pdb.yaml", "maxUnavailable: 1", "maxUnavailable: 0", "blocks every node drain"},
		{"the drain Job on another directory", "ops/spool-drain-job.yaml", `"--dir", "/var/lib/analyticsd/spool"`, `"--dir", "/var/lib/analyticsd/other"`, "no spool claim"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			broken := maps.Clone(files)
			orig, ok := files[c.file]
			if n := bytes.Count(orig, []byte(c.old)); !ok || n != 1 {
				t.Fatalf("%s contains %q %d times, want once; update the case", c.file, c.old, n)
			}
			broken[c.file] = bytes.Replace(orig, []byte(c.old), []byte(c.new), 1)
			ms, got := decodeManifests(broken)
			if len(got) == 0 {
				got = checkK8s(ms, known)
			}
			if !slices.ContainsFunc(got, func(s string) bool { return strings.Contains(s, c.want) }) {
				t.Errorf("want a problem containing %q, got %q", c.want, got)
			}
		})
	}
}
