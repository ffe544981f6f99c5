#!/usr/bin/env bash
# The main job: set up (which installs the shipped trained defaults next to the default
# generator, see defaults/), serve the four services, edit with InterFaceGAN along the shipped
# head-pose boundary and with SGF toward a yaw target through the shipped attribute mapping,
# and write images a person can look at (out/faces.png, out/edit-yaw.{png,gif},
# out/edit-sgf-yaw.{png,gif}); on the distilled StyleGAN2 default (W space), a per-layer yaw edit
# of W+ rows 0-3 (out/faces-stylegan2.png, out/edit-stylegan2-yaw-rows0-3.{png,gif}); then shut
# the services down cleanly. Nothing is trained unless a
# shipped artifact is missing (a checkout without defaults/): then it is trained once, and said so.
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
# The listing is read once: `models list | grep -q` would close the pipe early and, with pipefail,
# report an installed artifact as missing.
MODELS=$("${LE[@]}" models list)
installed() { grep -q "^$1 " <<< "$MODELS"; }
"${LE[@]}" generate --count 16 --seed 0 --out out/faces.png
if ! installed default-yaw; then
  echo "default-yaw is not installed (no shipped defaults/): training it once (a few minutes)"
  "${LE[@]}" train boundary --head pose --output yaw --samples 2000 --keep 0.1 --name default-yaw --key demo-default-yaw
fi
"${LE[@]}" edit --boundary default-yaw --start -3 --end 3 --frames 8 --seed 1 --count 4 --score pose --score expression --out out/edit-yaw
if ! installed default-sgf-attributes; then
  echo "default-sgf-attributes is not installed (no shipped defaults/): training it once (a few minutes)"
  "${LE[@]}" train mapping --condition attributes --attribute pose.yaw --attribute expression.probabilities.happy \
    --attribute pose.mouth_openness --attribute age_gender.male_probability --name default-sgf-attributes --key demo-default-sgf-attributes
fi
"${LE[@]}" edit --method sgf --mapping default-sgf-attributes --set pose.yaw=25 --seed 1 --count 4 --score pose --out out/edit-sgf-yaw
if installed stylegan2-faces; then
  "${LE[@]}" generate --model stylegan2-faces --count 16 --seed 0 --out out/faces-stylegan2.png
  if ! installed stylegan2-yaw; then
    echo "stylegan2-yaw is not installed: training it once in W (about a minute)"
    "${LE[@]}" train boundary --model stylegan2-faces --space w --head pose --output yaw --samples 1200 --keep 0.3 \
      --name stylegan2-yaw --key demo-stylegan2-yaw
  fi
  # A W boundary moving only W+ rows 0-3 (the 4 and 8 px blocks): pose changes, finer detail is kept.
  "${LE[@]}" edit --model stylegan2-faces --boundary stylegan2-yaw --rows 0:4 --start -3 --end 3 --frames 8 --seed 1 \
    --count 4 --score pose --out out/edit-stylegan2-yaw-rows0-3
  STYLEGAN2_OUT=", out/faces-stylegan2.png and out/edit-stylegan2-yaw-rows0-3.png (.gif)"
else
  STYLEGAN2_OUT=" (no StyleGAN2 default installed: defaults/stylegan2-faces is missing)"
fi
echo "open out/faces.png, out/edit-yaw.png (.gif), out/edit-sgf-yaw.png (.gif)${STYLEGAN2_OUT}; service logs are in out/serve.log"
echo "to edit in the browser: ${LE[*]} serve, then open http://localhost:8080/ (README: The web editor)"
