# PowerShell style (seed 004): settings as variables, backtick continuations.
$ckpt = "D:\sd\models\base-v15"   # base model folder
$image_dir = "D:\sd\train\style"  # parent of the <repeats>_<name> folders
$output = "D:\sd\loras"

$train_batch_size = 2
$learning_rate = 0.0002
$learning_rate = $learning_rate * $train_batch_size # scaled by the batch

accelerate launch --num_cpu_threads_per_process 8 train_network.py `
    --network_module="lycoris.kohya" `
    --network_args "conv_dim=8" "conv_alpha=1" "algo=locon" "preset=full" "block_dims=4,4,4"`
    --pretrained_model_name_or_path=$ckpt --train_data_dir=$image_dir --output_dir=$output `
    --resolution="512" --train_batch_size="$train_batch_size" `
    --learning_rate="$learning_rate" --max_train_epochs=6 `
    --optimizer_type="AdamW" --lr_scheduler="constant" --network_dim=16 --network_alpha=8
