#!/usr/bin/env bash
# A training script in the style the LoRA guides share (seed 004, "sample bash script"):
# variables at the top, then one accelerate line with continuations.
MODELS="/srv/sd/models" # base models
KOHYA="/srv/sd/sd-scripts" # the sd-scripts checkout

train_one() {
    cd "$KOHYA" || { echo "no sd-scripts here"; exit 1; }

    local concept="rosie" # the folder under SETS/
    local base="$MODELS/anything-v4-diffusers" # model to train from
    local image_dir="$KOHYA/SETS/$concept/img/"
    local reg_dir="$KOHYA/SETS/$concept/reg/" # may be empty
    local out_dir="/srv/sd/loras/"

    local lr="0.0001" # UNet learning rate
    local te_lr="0.00005" # text encoder learning rate
    local batch="2"
    local epochs="8"
    local save_every="2"
    local dim="96"
    local sched="cosine_with_restarts"

    . venv/bin/activate

    accelerate launch --num_cpu_threads_per_process 4 train_network.py \
    --network_module="networks.lora" \
    --pretrained_model_name_or_path="$base" --train_data_dir="$image_dir" --reg_data_dir="$reg_dir" --output_dir="$out_dir" \
    --output_name="${concept}_e${epochs}_d${dim}" \
    --caption_extension=".txt" --shuffle_caption --keep_tokens=1 \
    --prior_loss_weight=1 \
    --network_dim="$dim" --network_alpha=48 \
    --resolution=512 \
    --enable_bucket --min_bucket_reso=320 --max_bucket_reso=768 \
    --train_batch_size="$batch" \
    --learning_rate="$lr" --unet_lr="$lr" --text_encoder_lr="$te_lr" \
    --lr_scheduler="$sched" --lr_scheduler_num_cycles=3 \
    --max_train_epochs="$epochs" \
    --mixed_precision="fp16" --save_precision="fp16" \
    --use_8bit_adam --optimizer_args "weight_decay=0.1" "betas=(0.9,0.99)" --xformers \
    --save_every_n_epochs="$save_every" \
    --save_model_as=safetensors \
    --clip_skip=2 \
    --seed=31337 \
    --flip_aug --face_crop_aug_range="2.0,4.0" \
    --max_token_length=150 \
    --training_comment="LoRA of $concept" \
    --persistent_data_loader_workers
}

train_one "$@"
