"Argument checking for the primitives: errors that name the primitive, what it expected, and the script's line.

Every primitive is defined with the ``primitive`` decorator, which checks the number of arguments against the
signature and turns errors raised underneath (by the Python API or torch) into a ``PrimitiveError`` whose
message starts with the script's ``file:line`` and the primitive's LispE name::

    lora.hy:12: torch_hf_lora_init: rank must be a positive integer, got \"16\" (a string)
"

(import functools
        inspect
        os
        sys
        torch
        lispetorch.errors [LispetorchError])

(setv _HERE (os.path.dirname (os.path.abspath __file__)))
(setv _HY (os.path.dirname (os.path.abspath (. (hy.I "hy") __file__))))


(defclass PrimitiveError [LispetorchError ValueError TypeError]
  "A primitive called with bad arguments (or failing on them): the message names the script line, the
  primitive and what was wrong. It is a ``lispetorch.LispetorchError``, a ``ValueError`` and a ``TypeError``."

  (defn __init__ [self primitive message [location None]]
    (setv self.primitive primitive
          self.location (if (is location None) (script-location) location)
          self.detail message)
    (.__init__ (super) (if self.location
                           f"{self.location}: {primitive}: {message}"
                           f"{primitive}: {message}"))))


(defn script-location []
  "``file:line`` of the innermost frame that is not part of this package or of Hy (the caller's script), or None."
  (setv frame (sys._getframe 1))
  (while (is-not frame None)
    (setv path (os.path.abspath frame.f_code.co_filename))
    (when (not (or (.startswith path (+ _HERE os.sep))
                   (.startswith path (+ _HY os.sep))
                   (.startswith (os.path.basename path) "<")))
      (return f"{(os.path.relpath path)}:{frame.f_lineno}"))
    (setv frame frame.f_back))
  None)


(defn describe [value]
  "A short description of ``value`` for error messages: its text and its LispE-ish type."
  (cond (is value None) "nil"
        (isinstance value bool) (if value "true" "false")
        (isinstance value torch.Tensor)
          f"a tensor of shape {(list value.shape)} ({(. (str value.dtype) (removeprefix "torch."))})"
        (isinstance value str) f"{(repr (cut value 60))}{(if (> (len value) 60) "…" "")} (a string)"
        (isinstance value int) f"{value} (an integer)"
        (isinstance value float) f"{value} (a number)"
        (isinstance value #(list tuple))
          f"a list of {(len value)}{(if value (+ " starting with " (describe (get value 0))) "")}"
        (isinstance value dict) f"a dictionary with keys {(list (.keys value))}"
        True (let [text (repr value)
                   kind (. (type value) __name__)]
               f"{(cut text 60)}{(if (> (len text) 60) "…" "")} ({(if (in (get kind 0) "aeiouAEIOU") "an" "a")} {kind})")))


(defn usage [name signature]
  "LispE-style usage of a primitive: ``(name a b (optional))``."
  (setv parts [name])
  (for [p (.values signature.parameters)]
    (cond (= p.kind inspect.Parameter.VAR_POSITIONAL) (.append parts f"{p.name}…")
          (= p.kind inspect.Parameter.VAR_KEYWORD) None
          (is p.default inspect.Parameter.empty) (.append parts p.name)
          True (.append parts f"({p.name})")))
  (+ "(" (.join " " parts) ")"))


(defn primitive [f]
  "Decorator for a primitive: checks the argument count and names the primitive in every error."
  (setv signature (inspect.signature f)
        name f.__name__
        text (usage name signature))
  (defn [(functools.wraps f)] wrapper [#* args #** kwargs]
    (try
      (.bind signature #* args #** kwargs)
      (except [e TypeError]
        (raise (PrimitiveError name f"expects {text}, got {(len args)} argument{(if (= (len args) 1) "" "s")}"
                               ) :from None)))
    (try
      (f #* args #** kwargs)
      (except [e PrimitiveError]
        (raise))
      (except [e #(ValueError TypeError KeyError IndexError RuntimeError OSError)]
        (raise (PrimitiveError name (if (isinstance e KeyError) (repr (get e.args 0)) (str e))) :from e))))
  (setv wrapper.usage text)
  wrapper)


(defn fail [primitive message]
  "Raises a ``PrimitiveError`` for ``primitive``."
  (raise (PrimitiveError primitive message)))


(defn check-int [primitive what value [minimum None]]
  "``value`` as an int (an integral float is accepted); ``minimum`` is the smallest value allowed."
  (setv ok (and (isinstance value #(int float)) (not (isinstance value bool))
                (or (isinstance value int) (.is-integer value))))
  (when (and ok (is-not minimum None) (< value minimum))
    (setv ok False))
  (when (not ok)
    (fail primitive (+ f"{what} must be "
                       (cond (= minimum 1) "a positive integer"
                             (= minimum 0) "a non-negative integer"
                             (is minimum None) "an integer"
                             True f"an integer ≥ {minimum}")
                       f", got {(describe value)}")))
  (int value))


(defn check-number [primitive what value [positive False]]
  "``value`` as a float; ``positive`` demands > 0."
  (when (or (not (isinstance value #(int float))) (isinstance value bool) (and positive (<= value 0)))
    (fail primitive f"{what} must be {(if positive "a positive number" "a number")}, got {(describe value)}"))
  (float value))


(defn check-string [primitive what value]
  (when (not (isinstance value str))
    (fail primitive f"{what} must be a string, got {(describe value)}"))
  value)


(defn check-bool [primitive what value]
  "``value`` as a bool: true, false or nil (false)."
  (when (not (or (is value None) (isinstance value bool)))
    (fail primitive f"{what} must be true, false or nil, got {(describe value)}"))
  (bool value))


(defn check-tensor [primitive what value]
  (when (not (isinstance value torch.Tensor))
    (fail primitive f"{what} must be a tensor, got {(describe value)}"))
  value)


(defn check-dict [primitive what value [keys None]]
  "``value`` as a dict (nil: empty); with ``keys``, every key must be one of them."
  (when (is value None)
    (return {}))
  (when (not (isinstance value dict))
    (fail primitive f"{what} must be a dictionary, got {(describe value)}"))
  (when (is-not keys None)
    (for [k value]
      (when (not-in k keys)
        (fail primitive f"unknown {what} key {(repr k)}; the keys are {(.join ", " (map repr keys))}"))))
  value)


(defn check-module [primitive what value cls description]
  (when (not (isinstance value cls))
    (fail primitive f"{what} must be {description}, got {(describe value)}"))
  value)


(export :objects [PrimitiveError primitive fail describe script-location check-int check-number check-string
                  check-bool check-tensor check-dict check-module])
