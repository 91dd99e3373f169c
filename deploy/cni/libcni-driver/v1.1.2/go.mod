module weft.io/libcni-driver

go 1.21

require github.com/containernetworking/cni v1.1.2
