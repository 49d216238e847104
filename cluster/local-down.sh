#!/usr/bin/env bash
# Stop the local Ray cluster that cluster/local-up.sh started (every Ray node process on this machine).
set -euo pipefail
RAY=${RAY:-ray}
"$RAY" stop --grace-period 30
