#!/usr/bin/env bash
# The one-call GPU suite: build fastinpaint._C for sm_90, run the test suite on the
# GPU (every backend, bfloat16 included), run the benchmarks against eager and
# torch.compile(eager) (`fastinpaint bench <op>`, each with its own time limit), and write
# JSON + markdown results (GPU, driver, versions, date inside) to $RESULTS (default
# benchmarks/results/).
#
#   bash benchmarks/gpu_suite.sh            # under about 8 minutes: every step has a time limit,
#                                           # and the benchmarks write their files after each case
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTINPAINT_CUDA=1 PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
tag=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")_$(date -u +%Y%m%d)
log="$RESULTS/gpu_suite_${tag}.log"
status=0
step() { echo; echo "== $* =="; }
exec > >(tee "$log") 2>&1
step "device"; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
step "build (sm_90)"; t0=$(date +%s)
timeout 200 $PY setup.py build_ext --inplace >"$RESULTS/build.txt" 2>&1 || { tail -50 "$RESULTS/build.txt"; status=1; }
echo "build took $(( $(date +%s) - t0 )) s"; rm -f "$RESULTS/build.txt"
$PY -m fastinpaint.cli backends
step "tests: the whole suite, every backend on CUDA tensors (bfloat16 included); cuda and triton must be available"
FASTINPAINT_REQUIRE=cuda,triton timeout 180 $PY -m pytest tests -q -m "not slow" -p no:cacheprovider --junitxml="$RESULTS/gpu_tests_${tag}.xml" || status=1
step "benchmarks: bfloat16, channels_last, batch 8"
timeout 180 $PY -m fastinpaint.cli bench gated_conv --device cuda --dtype bfloat16 --batch 8 --min-time 0.3 \
    --json "$RESULTS/gated_conv_bf16_${tag}.json" --markdown "$RESULTS/gated_conv_bf16_${tag}.md" || status=1
step "benchmarks: float32, channels_last, batch 8"
timeout 60 $PY -m fastinpaint.cli bench gated_conv --device cuda --dtype float32 --batch 8 --min-time 0.2 --modes fwd+bwd \
    --cases conv1 "deconv 96" \
    --json "$RESULTS/gated_conv_fp32_${tag}.json" --markdown "$RESULTS/gated_conv_fp32_${tag}.md" || status=1
step "benchmarks: self-similarity maps / spatially-correlative distance, bfloat16"
timeout 60 $PY -m fastinpaint.cli bench self_similarity --device cuda --dtype bfloat16 --min-time 0.2 \
    --json "$RESULTS/self_similarity_bf16_${tag}.json" --markdown "$RESULTS/self_similarity_bf16_${tag}.md" || status=1
step "benchmarks: DeepFill v2 end to end (train step b8 @256, inference @512), bfloat16, channels_last"
timeout 60 $PY -m fastinpaint.cli bench deepfill_v2 --device cuda --dtype bfloat16 --channels-last --batch 8 \
    --size 256 --infer-size 512 --min-time 0.2 --cases "train step" "G inference" \
    --json "$RESULTS/deepfill_v2_bf16_${tag}.json" --markdown "$RESULTS/deepfill_v2_bf16_${tag}.md" || status=1
step "benchmarks: pixel attention + attention-transfer loss (DGII), B=8, N=4096/16384, Dqk=32, Dv=256, bfloat16"
timeout 60 $PY -m fastinpaint.cli bench pixel_attention --device cuda --dtype bfloat16 --batch 8 --sizes 4096 16384 \
    --modes fwd+bwd --min-time 0.1 \
    --json "$RESULTS/pixel_attention_bf16_${tag}.json" --markdown "$RESULTS/pixel_attention_bf16_${tag}.md" || status=1
step "benchmarks: channel-wise fully connected layer (Context Encoder shapes), bfloat16, vs eager and compile(eager)"
timeout 60 $PY -m fastinpaint.cli bench channel_fc --device cuda --dtype bfloat16 --min-time 0.1 \
    --cases "B64 C512" "B64 C256" "B16 C64" \
    --json "$RESULTS/channel_fc_bf16_${tag}.json" --markdown "$RESULTS/channel_fc_bf16_${tag}.md" || status=1
step "benchmarks: partial convolution (PConv U-Net layers), bfloat16, channels_last, batch 8"
timeout 60 $PY -m fastinpaint.cli bench partial_conv --device cuda --dtype bfloat16 --min-time 0.2 \
    --json "$RESULTS/partial_conv_bf16_${tag}.json" --markdown "$RESULTS/partial_conv_bf16_${tag}.md" || status=1
step "benchmarks: spectral-normalised convolutions (SN-PatchGAN layers), bfloat16, channels_last, batch 16"
timeout 60 $PY -m fastinpaint.cli bench spectral_norm_conv --device cuda --dtype bfloat16 --batch 16 --min-time 0.1 \
    --json "$RESULTS/spectral_norm_conv_bf16_${tag}.json" --markdown "$RESULTS/spectral_norm_conv_bf16_${tag}.md" || status=1
echo; echo "gpu suite status: $status"
exit $status
