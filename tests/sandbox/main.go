// Command kommit-sandbox runs a real Kubernetes control plane on one machine for kommit's tests
// and demo: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (fake nodes),
// each a child process of one supervisor. It also is a kubectl of the same version.
//
// Each component's cobra command installs its own signal handler, and a second one in the same
// process panics, so the binary re-executes itself with a sub-command per component.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/component-base/cli"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"

	// Metrics and log formats the upstream binaries register in their main packages.
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
)

const usage = `usage: kommit-sandbox COMMAND [ARGS...]

commands:
  run                  start the whole control plane (see run --help)
  kubectl ARGS...      kubectl of the same Kubernetes version
  etcd | apiserver | controller-manager | scheduler | kwok
                       one component (used by run; not meant to be called by hand)
`

func main() {
	// Invoked through a symlink named kubectl: behave as kubectl.
	if filepath.Base(os.Args[0]) == "kubectl" {
		os.Exit(runKubectl(os.Args[1:]))
	}
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	command, args := os.Args[1], os.Args[2:]
	// Components parse os.Args themselves; give them the arguments as if they were the program.
	os.Args = append([]string{command}, args...)
	switch command {
	case "run":
		os.Exit(runSupervisor(args))
	case "kubectl":
		os.Exit(runKubectl(args))
	case "etcd":
		os.Exit(runEtcd(args))
	case "apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	case "kwok":
		os.Exit(runKwok())
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "kommit-sandbox: unknown command %q\n\n%s", command, usage)
		os.Exit(2)
	}
}

func runKubectl(args []string) int {
	os.Args = append([]string{"kubectl"}, args...)
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
		return 1
	}
	return 0
}
