"""Store a teacher's top-k outputs on the training set, for distillation without the teacher (also
`hf-distill cache-teacher`).

    python scripts/cache_teacher.py --teacher asset:smollm2-135m --task causal-lm --dataset asset:news-articles \
        --block_size 256 --output_dir caches/smollm2-k32 --top_k 32 --temperature 1.0

Takes the model / data flags of scripts/distill.py, tokenises the training split the same way (same --seed for the
held-out split), and writes shards plus a manifest to --output_dir; rerun the same command to resume an interrupted
build. Distil from it by loading `hf_distill.data.teacher_cache.load_teacher_cache(dir)` as the training set.
"""

from hf_distill.cli import clear_errors
from hf_distill.cli.jobs import cache_teacher_main

if __name__ == "__main__":
    with clear_errors("hf-distill cache-teacher"):
        cache_teacher_main()
