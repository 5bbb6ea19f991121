#!/bin/sh
# Register every SuperNode public key mounted under /certs with the SuperLink.
# Run by the one-shot `register` service in compose.yaml; safe to re-run: keys the
# SuperLink already knows (its state lives in a volume) are reported and skipped.
set -eu

mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "compose"

[superlink.compose]
address = "${SUPERLINK_ADDRESS:-superlink:8000}"
root-certificates = "/certs/ca.crt"
TOML

found=0
for key in /certs/supernode-*.pub; do
    [ -e "$key" ] || continue
    found=1
    if out=$(flwr supernode register "$key" compose 2>&1); then
        echo "$out"
    elif echo "$out" | grep -qi "already in use"; then
        echo "$key: already registered"
    else
        echo "$out" >&2
        exit 1
    fi
done
if [ "$found" = 0 ]; then
    echo "no /certs/supernode-*.pub mounted; run: fedge certs docker/certs --hosts superlink fleet-gateway --nodes 3" >&2
    exit 1
fi
