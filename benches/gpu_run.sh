#!/usr/bin/env bash
# Everything a GPU lease is for, in one command: the CUDA tests and the GPU benchmarks.
#
#   benches/gpu_run.sh OUT_DIR STEP...      STEP: env tests kernels generate stories overlap bound bound-quick
#                                                 score profile families profile-families tp ray
#
# Runs from the repository root on a machine with torch, triton and transformers but no Rust: the
# compiled core comes along as python/cultengine/_core.abi3.so (built elsewhere with `maturin develop
# --release`; abi3, so any Python >= 3.11 imports it). Each step has its own time limit and a failing
# step does not stop the next; logs go to OUT_DIR/log.txt, result tables to OUT_DIR/results.tgz.
set -u
out=$1
shift
res=$(mktemp -d)
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log() { echo "=== $* ($(date +%T))" | tee -a "$out/log.txt"; }
run() {  # run LIMIT_SECONDS CMD...: one step, its output kept, the results tarred after it
    local limit=$1
    shift
    log "$*"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
    log "exit ${PIPESTATUS[0]}"
    tar -czf "$out/results.tgz" -C "$res" .
}
for step in "$@"; do
    case $step in
        env) run 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers, sys; print(sys.version, torch.__version__, triton.__version__, transformers.__version__)"' ;;
        tests) run 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py \
            tests/test_cascade_attention.py ;;
        families) run 240 python3 -m pytest -q -p no:cacheprovider -k "cuda or triton" tests/test_anyres_families.py \
            tests/test_qwen_families.py tests/test_vision_varlen.py tests/test_idefics3.py tests/test_internvl.py ;;
        kernels) run 200 python3 benches/bench_kernels.py --sweep --out "$res" ;;
        generate) run 560 python3 benches/bench_generate.py --device cuda --preset llava-1.5-7b --workload benchmark \
            --hf-batch-size 32 --out "$res" ;;
        overlap) run 420 python3 benches/bench_generate.py --device cuda --preset llava-1.5-7b --overlap-ab \
            --num-requests 256 --repeats 3 --out "$res" ;;
        stories) run 400 python3 benches/bench_generate.py --device cuda --preset llava-1.5-7b --workload stories \
            --repeats 1 --out "$res" ;;
        bound) run 300 python3 benches/bench_bound.py --trace --out "$res" ;;
        bound-quick) run 150 python3 benches/bench_bound.py --quick --out "$res" ;;
        score) run 240 python3 benches/bench_score.py --device cuda --preset llava-1.5-7b --out "$res" ;;
        profile) run 150 python3 -m cultengine.cli profile --model llava-1.5-7b --num-requests 1000 \
            --prompts-per-image 4 --prompt-len 16:64 --output-len 4:64 --shared-fraction 0 ;;
        profile-families) for m in llava-next-7b llava-onevision-7b qwen2.5-vl-7b smolvlm2-2.2b internvl3-8b; do
            run 150 python3 -m cultengine.cli profile --model $m --num-requests 200 --prompts-per-image 4 \
                --prompt-len 16:64 --output-len 4:64 --shared-fraction 0; done ;;
        tp) run 300 python3 -m pytest -q -p no:cacheprovider tests/test_tensor_parallel.py  # gloo ranks on the CPU
            # NCCL ranks need a GPU each: with 2 or more, the 7B preset over 2 of them
            if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
                run 300 python3 -m cultengine.cli profile --model llava-1.5-7b --tensor-parallel-size 2 \
                    --num-requests 256 --prompts-per-image 4 --prompt-len 16:64 --output-len 4:64 --shared-fraction 0
            else log "tp: one GPU here, NCCL tensor parallelism not run"; fi ;;
        ray) if python3 -c "import ray.data" 2>/dev/null; then  # the demo bench on the GPU: 1 process, then 1 replica
                run 200 python3 -m cultengine.cli bench --device cuda --out "$res/bench-local" --quiet
                run 300 python3 -m cultengine.cli bench --device cuda --out "$res/bench-ray" --ray-replicas 1 --quiet
            else log "ray: ray[data] is not installed here"; fi ;;
        *) log "unknown step $step" ;;
    esac
done
