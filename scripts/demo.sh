#!/usr/bin/env bash
# The main job: set up, serve the four services on the embedded default models, train a
# head-pose boundary through the trainer, stream an edit along it through the editor, and
# write images a person can look at (out/faces.png, out/edit-yaw.png, out/edit-yaw.gif);
# then shut the services down cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=${LATENTEDIT_CONFIG:-config/local.yaml}
LE=(.venv/bin/python -m latentedit --config "$CONFIG")
mkdir -p out
"${LE[@]}" serve > out/serve.log 2>&1 &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null || true' EXIT
"${LE[@]}" wait --timeout 180 || { echo "services did not come up; see out/serve.log"; tail -20 out/serve.log; exit 1; }
"${LE[@]}" generate --count 16 --seed 0 --out out/faces.png
"${LE[@]}" train boundary --head pose --output yaw --samples 2000 --keep 0.1 --name demo-yaw --key "demo-yaw-$(date +%s)"
"${LE[@]}" edit --boundary demo-yaw --start -3 --end 3 --frames 8 --seed 1 --count 4 --score pose --score expression --out out/edit-yaw
echo "open out/faces.png, out/edit-yaw.png and out/edit-yaw.gif; service logs are in out/serve.log"
