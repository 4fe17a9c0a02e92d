; The code blocks of the LispeTorch guide's "Complete Training Pipeline" section, then the optimizer and
; scheduler blocks of its "Optimizer and Scheduler" section, exactly as the guide writes them.
; test_lisp_pipeline.hy puts them together with a model path, a loss and a data set, and runs them.

; ---- Configuration ---------------------------------------------------------------------------------------
(use 'lispe_torch)
(use 'lispe_tiktoken)

; LoRA Configuration
(setq lora-config (dictionary
    "rank" 16
    "alpha" 32
    "target_modules" (strings "q_proj" "k_proj" "v_proj" "o_proj")
))

; Training Configuration
(setq training-config (dictionary
    "learning_rate" 2e-4
    "weight_decay" 0.01
    "num_epochs" 3
    "batch_size" 1
    "gradient_accumulation_steps" 4
    "max_seq_length" 256
    "logging_steps" 10
    "save_steps" 100
    "eval_steps" 50
    "warmup_steps" 100
    "max_grad_norm" 1.0
    "scheduler_type" "linear_warmup_cosine"
    "min_lr" 1e-6
    "device" "mps"  ; "mps" for Apple Silicon, "cuda" for NVIDIA, "cpu" otherwise
))

; ---- Model Loading and LoRA Setup ------------------------------------------------------------------------
; Load model with LoRA support
(torch_hf_load_model_lora
    "llama31_lora"
    model_path
    (dictionary "device" (@ training-config "device")))

; Initialize LoRA adapters
(torch_hf_lora_init
    "llama31_lora"
    (@ lora-config "rank")
    (@ lora-config "alpha")
    (@ lora-config "target_modules")
    "bfloat16")

; Get trainable parameters
(setq lora_params (torch_hf_lora_get_parameters "llama31_lora"))
(println "LoRA parameters:" (size lora_params) "tensors")

; ---- Training Step ---------------------------------------------------------------------------------------
(defun train_step(input_tensor is_accumulating optimizer config)
    ; Zero gradients at the start of new accumulation
    (check (not is_accumulating)
        (torch_optimizer_zero_grad optimizer))

    ; Forward pass - LoRA applied automatically
    (setq input_2d (tensor_reshape input_tensor (integers 1 -1)))
    (setq output (torch_hf_forward "llama31_lora" input_2d))

    ; Calculate loss
    (setq loss (calculate_loss output input_2d))

    (check loss
        ; Scale loss by accumulation steps
        (setq accum_steps (@ config "gradient_accumulation_steps"))
        (setq scaled_loss (tensor_div loss (tensor_create (floats accum_steps))))
        
        ; Backward pass
        (torch_backward scaled_loss)

        ; Synchronize GPU memory
        (torch_mps_synchronize)

        loss))

; ---- Weight Update ---------------------------------------------------------------------------------------
(defun should_update_weights(accumulation_step optimizer scheduler config)
    (setq accum_steps (@ config "gradient_accumulation_steps"))
    (setq should_update (== (% (+ accumulation_step 1) accum_steps) 0))

    (check should_update
        ; Gradient clipping
        (setq max_norm (@ config "max_grad_norm"))
        (check (> max_norm 0)
            (torch_clip_grad_norm optimizer max_norm))

        ; Optimizer and scheduler step
        (torch_optimizer_step optimizer)
        (torch_scheduler_step scheduler)

        ; Zero gradients after update
        (torch_optimizer_zero_grad optimizer))

    should_update)

; ---- Validation ------------------------------------------------------------------------------------------
(defun validate(model_name dataset_manager loss_calculator)
    ; Disable gradient computation
    (torch_set_grad_enabled false)

    (setq total_loss 0.0)
    (setq num_samples 5)

    (loopcount num_samples i
        (setq val_batch (dataset_manager DatasetManager (get_validation_batch 1)))
        (check (> (size val_batch) 0)
            (setq input_tensor (@ val_batch 0))
            (setq input_2d (tensor_reshape input_tensor (integers 1 -1)))
            (setq output (torch_hf_forward model_name input_2d))
            (setq loss (calculate_loss output input_2d))
            (check loss
                (+= total_loss (@ loss 0))))
        (torch_mps_synchronize))

    ; Re-enable gradient computation
    (torch_set_grad_enabled true)

    (/ total_loss num_samples))

; ---- Checkpoint Saving -----------------------------------------------------------------------------------
(defun save_checkpoint(model_name epoch checkpoint_dir lora_config training_config)
    (setq checkpoint_path (+ checkpoint_dir "/lora_adapters_epoch_" (string epoch) ".pt"))

    ; Save only LoRA adapters (lightweight!)
    (torch_hf_lora_save model_name checkpoint_path)

    ; Save metadata
    (setq checkpoint_info (dictionary
        "epoch" epoch
        "lora_config" lora_config
        "training_config" training_config))

    (setq info_file (+ checkpoint_dir "/training_info_epoch_" (string epoch) ".json"))
    (fwrite info_file (json checkpoint_info))

    (println "Checkpoint saved:" checkpoint_path))

; ---- Creating Optimizer with LoRA Parameters -------------------------------------------------------------
(setq optimizer (torch_optimizer_add_params
    lora_params
    (@ training-config "learning_rate")
    (@ training-config "weight_decay")))

; ---- Learning Rate Scheduler -----------------------------------------------------------------------------
(setq scheduler (torch_lr_scheduler optimizer (@ training-config "scheduler_type")
    (dictionary
        "initial_lr" (@ training-config "learning_rate")
        "min_lr" (@ training-config "min_lr")
        "total_steps" total_steps
        "warmup_steps" (@ training-config "warmup_steps"))))
