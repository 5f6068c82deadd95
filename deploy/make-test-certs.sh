#!/bin/sh
# Makes a TEST fleet CA and one certificate per peer daemon, for vfio-migd's [peer.tls].
#
#   deploy/make-test-certs.sh OUT_DIR NAME...
#
# Each NAME is the daemon's identity: a DNS name or an IP address, written as the
# certificate's subject alternative name. Use the name peers dial it by (the host of
# `vfio-migctl migrate --peer`) and the name the control plane passes as
# `vfio-migctl incoming --source-identity`. Writes OUT_DIR/ca.crt (give it to every
# daemon as [peer.tls] ca), OUT_DIR/NAME.crt and OUT_DIR/NAME.key (that daemon's cert
# and key), and keeps OUT_DIR/ca.key to issue more. For tests and labs: a production
# fleet gets its certificates from its own CA (cert-manager, Vault, ...).
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 OUT_DIR NAME..." >&2
    exit 2
fi
out=$1
shift
mkdir -p "$out"
umask 077

if [ ! -f "$out/ca.key" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
        -subj "/CN=vfio-migd test fleet CA" -keyout "$out/ca.key" -out "$out/ca.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
fi

for name in "$@"; do
    case $name in
        *:*) san="IP:$name" ;;        # IPv6
        *[!0-9.]*) san="DNS:$name" ;; # anything but digits and dots
        *) san="IP:$name" ;;          # IPv4
    esac
    ext="$out/$name.ext"
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' \
        "$san" >"$ext"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
        -keyout "$out/$name.key" -out "$out/$name.csr" 2>/dev/null
    openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
        -days 90 -extfile "$ext" -out "$out/$name.crt" 2>/dev/null
    rm -f "$out/$name.csr" "$ext"
    echo "$out/$name.crt ($san)"
done
