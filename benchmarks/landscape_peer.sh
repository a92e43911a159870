#!/usr/bin/env bash
# cryoDRGN train_vae on a landscape benchmark's images, given (a) the true poses, (b) a cryofire run's poses:
# the peer side of benchmarks/landscape_states.py (which scores the z.N.pkl files it leaves).
#
#   benchmarks/landscape_peer.sh W PEER_BIN EPOCHS MINUTES [extra train_vae args]
#
# W holds data/ (cryofire simulate: particles.star with the true poses, particles.mrcs) and run/ (cryofire train:
# particles.star with our poses, in the same particle order). PEER_BIN is the bin/ folder of cryoDRGN's own venv
# (python -m venv peer && peer/bin/pip install torch==2.13.0 && peer/bin/pip install cryodrgn==4.3.1).
# The images are Fourier-cropped to 32 px first (10.6 A/px at the benchmark's 5.28: the low resolution where the
# motion lives, as our landscape's 20 A), CTF and poses parsed from the STAR files at the full box.
# Each train_vae run stops after EPOCHS epochs or MINUTES minutes of wall time, whichever comes first (it writes
# z.N.pkl after every epoch N, 0-based: score the last one). Writes W/peer/{true,ours}/z.N.pkl and
# W/peer/{true,ours}.log (epoch times in cryoDRGN's log lines).
set -euo pipefail
W=$1; BIN=$2; EPOCHS=$3; MINUTES=$4; shift 4
D=$(awk '/^data_optics/{o=1} o && /^[0-9]/{print $7; exit}' "$W/data/particles.star")
APIX=$(awk '/^data_optics/{o=1} o && /^[0-9]/{print $6; exit}' "$W/data/particles.star")
mkdir -p "$W/peer"
cd "$W/peer"
[ -f p32.mrcs ] || "$BIN/cryodrgn" downsample ../data/particles.mrcs -D 32 -o p32.mrcs
"$BIN/cryodrgn" parse_ctf_star ../data/particles.star -o ctf.pkl -D "$D" --Apix "$APIX"
"$BIN/cryodrgn" parse_pose_star ../data/particles.star -o pose_true.pkl -D "$D" --Apix "$APIX"
"$BIN/cryodrgn" parse_pose_star ../run/particles.star -o pose_ours.pkl -D "$D" --Apix "$APIX"
for which in true ours; do
  timeout "$((MINUTES * 60))" "$BIN/cryodrgn" train_vae p32.mrcs --poses "pose_$which.pkl" --ctf ctf.pkl --zdim 8 \
    -n "$EPOCHS" -o "$which" --max-threads 2 --num-workers 0 --no-analysis "$@" > "$which.log" 2>&1 || [ $? -eq 124 ]
done
