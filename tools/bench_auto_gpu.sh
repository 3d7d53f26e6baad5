#!/usr/bin/env bash
# Issue 25's full-size `--auto --formats fp8,int8 --target-cosine 0.998` on the GPU machine, one step per device call
# (each within a 600 s call; JSON, logs and RSS timelines go to $OUT). Run from a checkout of the tree to measure;
# the model and calibration data from `tools/bench_sdxl.py --work /root/sdxl --stages export,calib --size 1024 --held-out 3`.
#
#   bash tools/bench_auto_gpu.sh auto  TAG [TREE]   # the whole job: -v log, report, RSS timeline (timeout 570 s)
#   bash tools/bench_auto_gpu.sh proxy TAG [TREE] [--no-unified] [--no-suffix]
#                                                   # staged sensitivities + one verification, per-stage timings
#   bash tools/bench_auto_gpu.sh same  TAG_A TAG_B  # Spearman of two proxies' sensitivities (same model and data)
#
# TREE (default: this checkout) is the onnxopt source tree to run, e.g. an old commit from
# `git archive <commit> --prefix=old/ | tar -x` (copy tools/auto_sens_proxy.py into old/tools first).
set -u
step=$1; tag=$2
here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}; SDXL=${SDXL:-/root/sdxl}
mkdir -p "$OUT"
case $step in
  auto)
    tree=$(cd "${3:-$here}" && pwd)
    cd "$tree" && PYTHONPATH=$tree:${PYTHONPATH:-} timeout 570 python3 "$here/tools/rss_timeline.py" \
      --json "$OUT/rss_$tag.json" -- python3 -m onnxopt -v quantize "$SDXL/unet.onnx" --auto --formats fp8,int8 \
      --target-cosine 0.998 --calib "$SDXL/calib.npz" --provider cuda --memory-budget 32000 \
      -o "/root/auto_$tag.onnx" --report "$OUT/report_$tag.json" > "$OUT/auto_$tag.log" 2>&1
    echo "exit $?"; grep -E "stage [0-9]+/|timings|auto-quantized|verifying mixes: done|staged evaluation" "$OUT/auto_$tag.log" | tail -45
    python3 - "$OUT/report_$tag.json" "$OUT/rss_$tag.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    sys.exit(0)
def find(d, key):
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            x = find(v, key)
            if x is not None:
                return x
print(json.dumps({k: find(r, k) for k in ("breakdown_s", "verified", "counts", "weight_bits", "met", "timings_s")}, default=str))
st = find(r, "staged")
if st:
    print(json.dumps({k: st.get(k) for k in ("n", "loads", "peak_live", "load_s", "reference_s", "types_s")}))
EOF
    ;;
  proxy)
    tree=$(cd "${3:-$here}" && pwd); shift 3 2>/dev/null || shift $#
    cd "$tree" && PYTHONPATH=$tree:${PYTHONPATH:-} timeout 570 python3 "$tree/tools/auto_sens_proxy.py" "$SDXL/unet.onnx" \
      "$SDXL/calib.npz" --provider cuda --formats fp8,int8 --memory-budget 32000 --json "$OUT/sens_$tag.json" "$@" \
      > "$OUT/sens_$tag.log" 2>&1
    echo "exit $?"; grep -v '"sensitivities"' "$OUT/sens_$tag.log" | head -60
    ;;
  same)
    python3 "$here/tools/auto_sens_proxy.py" --same "$OUT/sens_$2.json" "$OUT/sens_$3.json"
    ;;
  *) echo "usage: $0 auto|proxy|same ..."; exit 2 ;;
esac
