package main

import (
	"context"
	"embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	nodefast "sigs.k8s.io/kwok/kustomize/stage/node/fast"
	nodeheartbeat "sigs.k8s.io/kwok/kustomize/stage/node/heartbeat-with-lease"
	podfast "sigs.k8s.io/kwok/kustomize/stage/pod/fast"
)

//go:embed stages
var stageFiles embed.FS

type child struct {
	name string
	args []string
	cmd  *exec.Cmd
}

type exit struct {
	name string
	err  error
}

type supervisor struct {
	self     string
	logsDir  string
	children []*child
	exited   chan exit
	signals  chan os.Signal
}

func runSupervisor(args []string) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	dir := fs.String("dir", "target/sandbox", "state folder: data/, logs/, kubeconfig, ready")
	port := fs.Int("port", 46443, "kube-apiserver secure port on 127.0.0.1")
	etcdPort := fs.Int("etcd-port", 46379, "etcd client port (the peer port is the next one)")
	nodes := fs.Int("nodes", 3, "number of kwok nodes")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	started := time.Now()
	state, err := filepath.Abs(*dir)
	if err != nil {
		return fail("state folder: %v", err)
	}
	dataDir := filepath.Join(state, "data")
	logsDir := filepath.Join(state, "logs")
	readyFile := filepath.Join(state, "ready")
	_ = os.Remove(readyFile)
	if err := os.RemoveAll(dataDir); err != nil {
		return fail("clearing %s: %v", dataDir, err)
	}
	for _, d := range []string{dataDir, logsDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fail("creating %s: %v", d, err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return fail("finding own executable: %v", err)
	}
	s := &supervisor{self: self, logsDir: logsDir, exited: make(chan exit, 8), signals: make(chan os.Signal, 2)}
	signal.Notify(s.signals, syscall.SIGTERM, syscall.SIGINT)
	defer s.stopAll()

	certs, err := makePKI(filepath.Join(dataDir, "pki"))
	if err != nil {
		return fail("generating certificates: %v", err)
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", *port)
	componentKubeconfig := filepath.Join(dataDir, "admin.kubeconfig")
	if err := writeKubeconfig(componentKubeconfig, server, certs); err != nil {
		return fail("writing kubeconfig: %v", err)
	}
	kwokConfig := filepath.Join(dataDir, "kwok.yaml")
	if err := writeKwokConfig(kwokConfig); err != nil {
		return fail("writing kwok stages: %v", err)
	}

	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", *etcdPort)
	s.start("etcd", "--data-dir", filepath.Join(dataDir, "etcd"), "--client-url", etcdURL,
		"--peer-url", fmt.Sprintf("http://127.0.0.1:%d", *etcdPort+1))
	if err := s.waitFor("etcd is healthy", 60*time.Second, func() error { return httpOK(etcdURL + "/health") }); err != nil {
		return fail("%v", err)
	}
	logf("etcd ready after %s", since(started))

	s.start("apiserver",
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(*port),
		"--tls-cert-file="+certs.servingCert,
		"--tls-private-key-file="+certs.servingKey,
		"--client-ca-file="+certs.caCert,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+certs.saPubKey,
		"--service-account-signing-key-file="+certs.serviceAccountKey,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--authorization-mode=Node,RBAC",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--event-ttl=30m",
		"--v=0",
	)
	clientset, err := clientFor(componentKubeconfig)
	if err != nil {
		return fail("client: %v", err)
	}
	ctx := context.Background()
	if err := s.waitFor("kube-apiserver is ready", 180*time.Second, func() error {
		_, err := clientset.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return fail("%v", err)
	}
	logf("kube-apiserver ready after %s", since(started))

	s.start("controller-manager",
		"--kubeconfig="+componentKubeconfig,
		"--authentication-kubeconfig="+componentKubeconfig,
		"--authorization-kubeconfig="+componentKubeconfig,
		"--controllers=*",
		"--service-account-private-key-file="+certs.serviceAccountKey,
		"--root-ca-file="+certs.caCert,
		"--cluster-signing-cert-file="+certs.caCert,
		"--cluster-signing-key-file="+certs.caKey,
		"--use-service-account-credentials=true",
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--profiling=false",
		"--v=0",
	)
	s.start("scheduler",
		"--kubeconfig="+componentKubeconfig,
		"--authentication-kubeconfig="+componentKubeconfig,
		"--authorization-kubeconfig="+componentKubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--profiling=false",
		"--v=0",
	)
	s.start("kwok",
		"--kubeconfig="+componentKubeconfig,
		"--config="+kwokConfig,
		"--manage-all-nodes=false",
		"--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
		"--cidr=10.244.0.0/16",
		"--node-ip=10.1.0.1",
		"--node-lease-duration-seconds=40",
		"--v=WARN",
	)

	for i := 0; i < *nodes; i++ {
		if err := createNode(ctx, clientset, fmt.Sprintf("kwok-node-%d", i), fmt.Sprintf("10.1.0.%d", i+1)); err != nil {
			return fail("creating node: %v", err)
		}
	}
	if err := s.waitFor("the nodes are Ready and the default ServiceAccount exists", 180*time.Second, func() error {
		return clusterUsable(ctx, clientset, *nodes)
	}); err != nil {
		return fail("%v", err)
	}
	// The user's kubeconfig appears only once the cluster can run pods.
	userKubeconfig := filepath.Join(state, "kubeconfig")
	if err := writeKubeconfig(userKubeconfig, server, certs); err != nil {
		return fail("writing %s: %v", userKubeconfig, err)
	}
	if err := os.WriteFile(readyFile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return fail("writing %s: %v", readyFile, err)
	}
	logf("sandbox ready after %s: kubeconfig %s", since(started), userKubeconfig)

	// SIGUSR1 restarts the component named in the file "restart" (scripts/sandbox restart), as
	// chaos tests need: killed, then started again with the same arguments and data.
	restarts := make(chan os.Signal, 1)
	signal.Notify(restarts, syscall.SIGUSR1)
	restarting := ""
	for {
		select {
		case sig := <-s.signals:
			logf("received %s, stopping", sig)
			_ = os.Remove(readyFile)
			return 0
		case <-restarts:
			name, err := os.ReadFile(filepath.Join(state, "restart"))
			if err != nil {
				logf("restart: %v", err)
				continue
			}
			restarting = strings.TrimSpace(string(name))
			found := false
			for _, c := range s.children {
				if c.name == restarting && c.cmd.Process != nil {
					logf("restarting %s (pid %d)", c.name, c.cmd.Process.Pid)
					_ = c.cmd.Process.Kill()
					found = true
				}
			}
			if !found {
				logf("restart: no component %q", restarting)
				restarting = ""
			}
		case e := <-s.exited:
			if e.name == restarting {
				for _, c := range s.children {
					if c.name == restarting {
						s.start(c.name, c.args...)
						break
					}
				}
				restarting = ""
				continue
			}
			_ = os.Remove(readyFile)
			return fail("%s exited unexpectedly (%v); see %s", e.name, e.err, filepath.Join(logsDir, e.name+".log"))
		}
	}
}

// start launches a component as a child process; it dies with the supervisor (Pdeathsig).
func (s *supervisor) start(name string, args ...string) {
	logPath := filepath.Join(s.logsDir, name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		logf("cannot open %s: %v", logPath, err)
		logFile = nil
	}
	cmd := exec.Command(s.self, append([]string{name}, args...)...)
	var out io.Writer = os.Stderr
	if logFile != nil {
		out = logFile
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.exited <- exit{name, err}
		return
	}
	logf("started %s (pid %d), log %s", name, cmd.Process.Pid, logPath)
	c := &child{name: name, args: args, cmd: cmd}
	replaced := false
	for i, old := range s.children {
		if old.name == name {
			s.children[i] = c
			replaced = true
		}
	}
	if !replaced {
		s.children = append(s.children, c)
	}
	go func() {
		err := cmd.Wait()
		if logFile != nil {
			_ = logFile.Close()
		}
		s.exited <- exit{name, err}
	}()
}

// waitFor polls check until it succeeds, a child dies, a signal arrives or time runs out.
func (s *supervisor) waitFor(what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		select {
		case e := <-s.exited:
			return fmt.Errorf("%s exited while waiting until %s (%v); see %s", e.name, what, e.err,
				filepath.Join(s.logsDir, e.name+".log"))
		case sig := <-s.signals:
			return fmt.Errorf("received %s while waiting until %s", sig, what)
		case <-time.After(250 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting until %s: %v", timeout, what, last)
		}
	}
}

// stopAll stops the children in reverse order: SIGTERM, then SIGKILL after a grace period.
func (s *supervisor) stopAll() {
	for i := len(s.children) - 1; i >= 0; i-- {
		c := s.children[i]
		if c.cmd.ProcessState == nil && c.cmd.Process != nil {
			_ = c.cmd.Process.Signal(syscall.SIGTERM)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, c := range s.children {
		for c.cmd.ProcessState == nil && c.cmd.Process != nil && time.Now().Before(deadline) {
			if err := c.cmd.Process.Signal(syscall.Signal(0)); err != nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if c.cmd.Process != nil {
			_ = c.cmd.Process.Kill()
		}
	}
}

func writeKwokConfig(path string) error {
	own, err := stageFiles.ReadFile("stages/pods.yaml")
	if err != nil {
		return err
	}
	lines := strings.Split(string(own), "\n")
	for i, line := range lines {
		trimmed := strings.TrimSpace(line)
		if !strings.HasPrefix(trimmed, "statusTemplate: '@") {
			continue
		}
		file := strings.TrimSuffix(strings.TrimPrefix(trimmed, "statusTemplate: '@"), "'")
		body, err := stageFiles.ReadFile("stages/" + file)
		if err != nil {
			return fmt.Errorf("stage template %s: %w", file, err)
		}
		indent := line[:len(line)-len(strings.TrimLeft(line, " "))]
		var b strings.Builder
		b.WriteString(indent + "statusTemplate: |\n")
		for _, bodyLine := range strings.Split(strings.TrimRight(string(body), "\n"), "\n") {
			b.WriteString(indent + "  " + bodyLine + "\n")
		}
		lines[i] = strings.TrimRight(b.String(), "\n")
	}
	docs := []string{
		nodefast.DefaultNodeInit,
		nodeheartbeat.DefaultNodeHeartbeatWithLease,
		podfast.DefaultPodComplete,
		podfast.DefaultPodDelete,
		strings.Join(lines, "\n"),
	}
	return os.WriteFile(path, []byte(strings.Join(docs, "\n---\n")), 0o644)
}

// createNode registers a node for kwok to manage, with the resources of a large real node (kwok's
// node-initialize stage keeps the allocatable, capacity and addresses it finds). The pod cap is
// above kubelet's default of 110: scripts/bench runs 1,100 one-replica Deployments on 3 nodes.
func createNode(ctx context.Context, clientset *kubernetes.Clientset, name, ip string) error {
	resources := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("32"),
		corev1.ResourceMemory: resource.MustParse("256Gi"),
		corev1.ResourcePods:   resource.MustParse("500"),
	}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Labels: map[string]string{
				"type":                   "kwok",
				"kubernetes.io/hostname": name,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     "amd64",
				"kubernetes.io/role":     "agent",
			},
			Annotations: map[string]string{
				"kwok.x-k8s.io/node":           "fake",
				"node.alpha.kubernetes.io/ttl": "0",
			},
		},
		Status: corev1.NodeStatus{
			Allocatable: resources,
			Capacity:    resources,
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: ip},
				{Type: corev1.NodeHostName, Address: name},
			},
		},
	}
	_, err := clientset.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

func clusterUsable(ctx context.Context, clientset *kubernetes.Clientset, want int) error {
	nodes, err := clientset.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	ready := 0
	for _, node := range nodes.Items {
		schedulable := true
		for _, taint := range node.Spec.Taints {
			if taint.Effect == corev1.TaintEffectNoSchedule {
				schedulable = false
			}
		}
		for _, condition := range node.Status.Conditions {
			if condition.Type == corev1.NodeReady && condition.Status == corev1.ConditionTrue && schedulable {
				ready++
			}
		}
	}
	if ready < want {
		return fmt.Errorf("%d of %d nodes Ready and schedulable", ready, want)
	}
	if _, err := clientset.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
		return fmt.Errorf("default ServiceAccount: %w", err)
	}
	return nil
}

func clientFor(kubeconfig string) (*kubernetes.Clientset, error) {
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	config.Timeout = 10 * time.Second
	return kubernetes.NewForConfig(config)
}

func httpOK(url string) error {
	client := http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return errors.New(resp.Status)
	}
	return nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s sandbox: %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func fail(format string, args ...any) int {
	logf("error: "+format, args...)
	return 1
}

func since(t time.Time) string {
	return time.Since(t).Round(100 * time.Millisecond).String()
}
