package client_test

import (
	"os/exec"
	"syscall"
)

// dieWithTest makes the server get SIGKILL if the test binary dies first (a panic, go test's
// timeout), so no server outlives its test on a shared machine.
func dieWithTest(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
