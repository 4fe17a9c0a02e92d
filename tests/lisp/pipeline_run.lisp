; The training loop around the guide's functions: 2 epochs over 8 samples, accumulation 4 (4 updates),
; validation and a checkpoint after each epoch.
(setq accumulation_step 0)
(setq global_step 0)
(setq train_losses (list))
(setq validation_losses (list))
(loopcount 2 epoch
    (loopcount (size train_samples) i
        (setq loss (train_step (@ train_samples i) (> (% accumulation_step 4) 0) optimizer training-config))
        (push train_losses (@ loss 0))
        (check (should_update_weights accumulation_step optimizer scheduler training-config)
            (+= global_step 1))
        (+= accumulation_step 1))
    (push validation_losses (validate "llama31_lora" dataset_manager_object nil))
    (save_checkpoint "llama31_lora" (+ epoch 1) checkpoint_dir lora-config training-config))
