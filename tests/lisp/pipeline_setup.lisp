; What the guide's pipeline leaves to the script around it: the model path, the data, the loss, and the
; dataset manager's interface. Arguments: MODEL_DIR CHECKPOINT_DIR CORPUS_FILE.
(setq model_path (@ sys.argv 1))
(setq checkpoint_dir (@ sys.argv 2))
(setq corpus_file (@ sys.argv 3))
(setq window 32)

; Training and validation windows of real code (a standard-library source file), tokenized by the model's
; own tokenizer.
(setq tokenizer (torch_hf_load_tokenizer model_path))
(setq token_ids (torch_encode tokenizer (fread corpus_file)))
(setq samples (list))
(loopcount 10 i
    (push samples (tensor_create (cut token_ids (* i window) (* (+ i 1) window)))))
(setq train_samples (cut samples 0 8))
(setq validation_samples (cut samples 8 10))

; The dataset manager of the guide's validation: (dataset_manager DatasetManager (get_validation_batch 1)).
(setq DatasetManager "DatasetManager")
(defun get_validation_batch(max_samples)
    (setq batch (list))
    (loopcount (min max_samples (size validation_samples)) i
        (push batch (@ validation_samples i)))
    batch)
(defun dataset_manager_object(class_name batch) batch)

; Next-token cross-entropy, as LispE's own LossCalculator computes it.
(defun calculate_loss(logits input_tokens)
    (setq seq_len (@ (tensor_shape logits) 1))
    (setq vocab_size (@ (tensor_shape logits) 2))
    (check (> seq_len 1)
        (setq pred_flat (tensor_reshape (tensor_slice logits 1 0 (- seq_len 1)) (integers -1 vocab_size)))
        (setq target_flat (tensor_reshape (tensor_slice input_tokens 1 1 seq_len) (integers -1)))
        (torch_cross_entropy pred_flat target_flat)))

(setq total_steps 4)
