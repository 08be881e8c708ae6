"""Train the student on teacher rationales: weighted LM loss + self-reflection triplet loss.

    python run_trainer.py --device 0,1,2,3,4,5,6,7 --task gsm8k --load EleutherAI/gpt-j-6B \
        --teacher_data localdataset/gsm8k/gsm8k.train.round1.json --fewshot yes --train_bsz 2 --fp16 yes \
        --contrastive yes --cl_pos_path ... --cl_neg_path ... --deepspeed ds_stage3_config.json
--device with several ids re-launches under torchrun (one process per id); `torchrun`, `deepspeed`
and `accelerate launch` work too. Two CPU processes: `--device 0,1` on a machine without GPU.
"""
from __future__ import annotations

import distributed
from args import TrainArguments


main = distributed.script_main(TrainArguments, "train_setup:run_training", relaunch=True)

if __name__ == "__main__":
    main()
