// Registers and lists endpoints through etcd's own Go naming package (the endpoints manager
// that gRPC's etcd resolver reads), for sd-etcd's interop test.
//
//	naming ENDPOINT TARGET add KEY ADDR METADATA_JSON
//	naming ENDPOINT TARGET list
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/naming/endpoints"
)

func fail(err interface{}) {
	fmt.Fprintln(os.Stderr, "naming:", err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 4 {
		fail("usage: naming ENDPOINT TARGET add KEY ADDR METADATA_JSON | list")
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{os.Args[1]},
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		fail(err)
	}
	defer cli.Close()
	m, err := endpoints.NewManager(cli, os.Args[2])
	if err != nil {
		fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch os.Args[3] {
	case "add":
		if len(os.Args) != 7 {
			fail("usage: naming ENDPOINT TARGET add KEY ADDR METADATA_JSON")
		}
		var meta interface{}
		if err := json.Unmarshal([]byte(os.Args[6]), &meta); err != nil {
			fail(err)
		}
		err = m.AddEndpoint(ctx, os.Args[4], endpoints.Endpoint{Addr: os.Args[5], Metadata: meta})
	case "list":
		var eps endpoints.Key2EndpointMap
		if eps, err = m.List(ctx); err == nil {
			out, _ := json.Marshal(eps)
			fmt.Println(string(out))
		}
	default:
		fail("unknown command " + os.Args[3])
	}
	if err != nil {
		fail(err)
	}
}
