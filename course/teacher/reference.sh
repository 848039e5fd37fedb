#!/bin/bash
# The slow exercises' runs (5-9, 11), one after another, for course/teacher/reference/: each
# run's summary and curves, and times.csv (seconds per exercise). The fast option samples 200
# answers per model instead of 1,000 (the flaw rates' standard errors grow about 2.2x; the
# log-probs and margins do not change). Run from the project's root, with the venv active:
#     bash course/teacher/reference.sh [OUT [EXERCISE ...]]  # OUT: out-reference; default: all
#     bash course/teacher/reference.sh out-reference ex5 ex7 # only these (ex5 ... ex9, ex11)
#     N_SAMPLES=1000 bash course/teacher/reference.sh        # as EXERCISES.md's numbers were made
set -u
OUT=${1:-out-reference}
ONLY=" ${*:2} "
F=--n_samples=${N_SAMPLES:-200}
mkdir -p "$OUT"
[ -f "$OUT/times.csv" ] || echo "exercise,status,seconds" > "$OUT/times.csv"
t() {  # t NAME COMMAND...: run it, log it, time it
    local name=$1; shift
    [[ "$ONLY" == "  " || "$ONLY" == *" ${name%%-*} "* ]] || return 0
    local s=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name,$?,$(( $(date +%s) - s ))" >> "$OUT/times.csv"
}
t ex5 python -m experiments.figures sft-vs-orpo --config small $F --out_dir="$OUT/ex5"
t ex6 python -m experiments.figures lambda --config small $F --out_dir="$OUT/ex6"
t ex7 python orpo.py --config small --sft_on_prompt=true $F --out_dir="$OUT/ex7-prompt"
t ex8 python -m experiments.figures ratio --config small $F --out_dir="$OUT/ex8"
t ex9 python -m experiments.figures length --config small $F --out_dir="$OUT/ex9"
t ex11-methods python -m experiments.figures methods --config small --tune_samples=0 $F --out_dir="$OUT/ex11"
t ex11-sft python orpo.py --config small --lam=0 $F --out_dir="$OUT/ex11-sft"
for b in 0.01 0.1 1.0; do
    t ex11-dpo-$b python orpo.py --config small --loss=dpo --init_from="$OUT/ex11-sft/ckpt.pt" \
        --ref="$OUT/ex11-sft/ckpt.pt" --max_iters=300 --lr=1e-4 --min_lr=1e-5 --beta=$b $F \
        --out_dir="$OUT/ex11-dpo-$b"
done
cat "$OUT/times.csv"
