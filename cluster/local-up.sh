#!/usr/bin/env bash
# Start a Ray cluster on this machine with the shape of the KubeRay manifests, so the CLI commands run
# against it exactly as they run in a RayJob (docs/operations.md, "from laptop to cluster"):
#
#   cluster/local-up.sh                     # head with all CPUs (and GPUs), token auth on
#   WORKERS=2 CPUS=1 cluster/local-up.sh    # plus 2 extra worker nodes of 1 CPU each (a small multi-node test)
#   export RAY_ADDRESS=127.0.0.1:6379       # then: motiondirector ingest ... / train-batch ... / serve ...
#   cluster/local-down.sh
#
# The head gets the custom resource `decode` (one per CPU) like the decode worker group. Token auth is on
# (RAY_AUTH_MODE=token, Ray's default for local clusters since 2.59): the token is generated once into
# Ray's default token file (~/.ray/auth_token) and every process on this machine reads it from there.
# RAY_AUTH_MODE=disabled turns it off (only on a machine nobody else can reach).
set -euo pipefail

RAY=${RAY:-ray}
PORT=${PORT:-6379}
CPUS=${CPUS:-$(nproc)}
WORKERS=${WORKERS:-0}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

if [[ "$RAY_AUTH_MODE" == token ]]; then
  "$RAY" get-auth-token --generate > /dev/null   # keeps an existing token
fi

gpus=()
if [[ -n "${GPUS:-}" ]]; then
  gpus=(--num-gpus "$GPUS")                     # else Ray detects them
fi

"$RAY" start --head --port "$PORT" --dashboard-host 127.0.0.1 --num-cpus "$CPUS" "${gpus[@]}" \
  --resources "{\"decode\": $CPUS}" --disable-usage-stats

for ((index = 1; index <= WORKERS; index++)); do
  "$RAY" start --address "127.0.0.1:$PORT" --num-cpus "$CPUS" --num-gpus 0 \
    --resources "{\"decode\": $CPUS}" --disable-usage-stats
done

echo "Ray is up at 127.0.0.1:$PORT (dashboard http://127.0.0.1:8265), auth: $RAY_AUTH_MODE."
echo "Run the CLI against it with: export RAY_ADDRESS=127.0.0.1:$PORT"
