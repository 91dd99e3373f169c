// libcni-driver calls a CNI network config list the way a container
// runtime does, through libcni: the library containerd, CRI-O and podman
// are built on. weft's tests run it against weft-cni at the libcni
// versions those runtimes ship, so the plugin is tested by the code that
// calls it in production, not by a copy of it.
//
//	libcni-driver add|check|del -conflist FILE -netns PATH -id CONTAINER_ID
//	    [-ifname eth0] [-args K=V;K=V] [-cap-args JSON] [-cache-dir DIR]
//
// CNI_PATH names the plugin directories. ADD prints the result; a failure
// prints the plugin's CNI error object ({"code", "msg", "details"}) and
// exits 1, so a test can check the code.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: libcni-driver add|check|del -conflist FILE -netns PATH -id ID"))
	}
	command := os.Args[1]
	flags := flag.NewFlagSet(command, flag.ExitOnError)
	conflist := flags.String("conflist", "", "network config list file")
	netns := flags.String("netns", "", "network namespace path")
	id := flags.String("id", "", "container ID")
	ifname := flags.String("ifname", "eth0", "interface name in the container")
	args := flags.String("args", "", "CNI_ARGS, K=V;K=V")
	capArgs := flags.String("cap-args", "", "capability arguments as JSON, e.g. {\"portMappings\": [...]}")
	cacheDir := flags.String("cache-dir", "/var/lib/cni", "where libcni caches ADD results")
	if err := flags.Parse(os.Args[2:]); err != nil {
		fail(err)
	}

	bytes, err := os.ReadFile(*conflist)
	if err != nil {
		fail(err)
	}
	list, err := libcni.ConfListFromBytes(bytes)
	if err != nil {
		fail(err)
	}
	rt := &libcni.RuntimeConf{ContainerID: *id, NetNS: *netns, IfName: *ifname}
	for _, kv := range strings.Split(*args, ";") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			rt.Args = append(rt.Args, [2]string{k, v})
		}
	}
	if *capArgs != "" {
		if err := json.Unmarshal([]byte(*capArgs), &rt.CapabilityArgs); err != nil {
			fail(fmt.Errorf("-cap-args: %w", err))
		}
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), *cacheDir, nil)
	ctx := context.Background()

	switch command {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		if err := result.Print(); err != nil {
			fail(err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	default:
		fail(fmt.Errorf("unknown command %q", command))
	}
}

// fail prints the plugin's CNI error object when there is one (code 999
// for a failure of libcni itself) and exits 1.
func fail(err error) {
	var cniErr *types.Error
	if !errors.As(err, &cniErr) {
		cniErr = &types.Error{Code: 999, Msg: err.Error()}
	}
	out, _ := json.Marshal(cniErr)
	fmt.Println(string(out))
	os.Exit(1)
}
