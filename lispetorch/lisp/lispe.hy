"LispE-style macros and functions, so that scripts written for LispE run with few or no edits.

Macros (``(require lispetorch.lisp.lispe *)``; ``lispetorch run`` has them in scope):

- ``(setq name value)`` assigns (``setv``): local inside a function, global at top level, as in LispE.
- ``(defun name(a b (c 10)) body…)`` defines a function; parameters are written in parentheses, an optional
  one as ``(name default)``. The value of the last form is returned.
- ``(check condition body…)`` runs ``body`` when ``condition`` is true in LispE's sense (see ``truthy``) and
  returns its last value, else nil.
- ``(loopcount n [i] body…)`` runs ``body`` ``n`` times, ``i`` counting from 0 when given.
- ``(loop x collection body…)`` runs ``body`` for each element; ``(block body…)`` groups forms (``do``).
- ``(@ container key…)`` nested access into dictionaries, lists, strings and tensors; ``(@ t1 t2)`` with two
  tensors is still the matrix product.

Functions: ``dictionary``, ``strings``, ``integers``, ``floats``, ``println``, ``string``, ``size``, ``push``,
``fread``, ``fwrite`` (atomic), ``json``, ``json_parse``, ``use``, ``==`` (Hy's ``=``), and the constants ``nil``, ``true``,
``false``. ``+=`` is Hy's own.

Examples::

    (setq config (dictionary \"rank\" 16 \"targets\" (strings \"q_proj\" \"v_proj\")))
    (@ config \"targets\" 1)        ; => \"v_proj\"
    (defun twice(x) (* 2 x))
    (check (> (twice 2) 3) \"big\") ; => \"big\"
"

(pragma :warn-on-core-shadow False)

(import json :as _json
        torch
        lispetorch.atomic
        lispetorch.lisp.checks [primitive fail describe check-string])

(setv nil None
      true True
      false False)

;; The libraries a LispE script may `use`: everything they provide is already in scope.
(setv LIBRARIES #("lispe_torch" "lispe_tiktoken"))


;; --- truthiness and access ------------------------------------------------------------------------------
(defn truthy [value]
  "LispE's truth: nil, false, 0, and empty strings, lists and dictionaries are false; a tensor is true
  whenever it exists, whatever its values; anything else is true.

  ``(truthy (tensor_create (floats 0.0)))`` ; => True"
  (cond (is value None) False
        (isinstance value bool) value
        (isinstance value torch.Tensor) True
        (isinstance value #(int float)) (!= value 0)
        (isinstance value #(str list tuple dict set)) (> (len value) 0)
        True True))


(defn at [container #* keys]
  "``(@ c k1 k2 …)``: ``c[k1][k2]…`` with errors that name the missing key; ``(@ t1 t2)`` with two tensors is
  ``t1 @ t2``. An element of a tensor comes back as a number (LispE reads a scalar as a one-element tensor,
  so ``(@ loss 0)`` is the value of a scalar loss)."
  (when (and (= (len keys) 1) (isinstance container torch.Tensor) (isinstance (get keys 0) torch.Tensor)
             (torch.is-floating-point (get keys 0)))
    (return (torch.matmul container (get keys 0))))
  (setv value container)
  (for [key keys]
    (setv value (_at-one value key)))
  value)


(defn _at-one [value key]
  (cond
    (isinstance value dict)
      (do (when (not-in key value)
            (fail "@" f"no key {(repr key)} in the dictionary; its keys are {(list (.keys value))}"))
          (get value key))
    (isinstance value torch.Tensor)
      (do (when (= value.ndim 0)
            (if (in key #(0 -1))
                (return (.item value))
                (fail "@" f"index {(describe key)} does not fit {(describe value)} (a scalar: use 0)")))
          (when (and (isinstance key int) (not (isinstance key bool))
                     (not (<= (- (get value.shape 0)) key (- (get value.shape 0) 1))))
            (fail "@" f"index {key} is out of range for {(describe value)}"))
          (setv out (get value key))
          (if (and (isinstance out torch.Tensor) (= out.ndim 0)) (.item out) out))
    (isinstance value #(list tuple str))
      (do (when (or (not (isinstance key int)) (isinstance key bool))
            (fail "@" f"a list is indexed by an integer, got {(describe key)}"))
          (when (not (<= (- (len value)) key (- (len value) 1)))
            (fail "@" f"index {key} is out of range for {(describe value)}"))
          (get value key))
    (is value None) (fail "@" f"cannot look up {(describe key)} in nil")
    True (try (get value key)
              (except [e #(KeyError IndexError TypeError)]
                (fail "@" f"cannot look up {(describe key)} in {(describe value)}")))))


;; --- comparison ---------------------------------------------------------------------------------------
(defn == [a b #* more]
  "LispE's equality (Hy's is ``=``): ``(== 1 1)`` ; => True; more arguments compare in a chain."
  (setv values [a b #* more])
  (all (gfor [x y] (zip values (cut values 1 None)) (= x y))))


;; --- constructors ---------------------------------------------------------------------------------------
(defn [primitive] dictionary [#* keys-and-values]
  "``(dictionary k1 v1 k2 v2 …)``: a dict. ``(dictionary \"a\" 1)`` ; => {\"a\" 1}"
  (when (% (len keys-and-values) 2)
    (fail "dictionary" f"expects keys and values in pairs, got {(len keys-and-values)} arguments"))
  (dfor [k v] (zip (cut keys-and-values 0 None 2) (cut keys-and-values 1 None 2)) k v))


(defn [primitive] strings [#* values]
  "``(strings \"a\" \"b\")``: a list of strings."
  (for [[i v] (enumerate values)]
    (when (not (isinstance v str))
      (fail "strings" f"element {i} must be a string, got {(describe v)}")))
  (list values))


(defn [primitive] integers [#* values]
  "``(integers 1 -1)``: a list of integers (integral numbers are accepted)."
  (lfor [i v] (enumerate values)
        (if (and (isinstance v #(int float)) (not (isinstance v bool)) (or (isinstance v int) (.is-integer v)))
            (int v)
            (fail "integers" f"element {i} must be an integer, got {(describe v)}"))))


(defn [primitive] floats [#* values]
  "``(floats 1 2.5)``: a list of numbers."
  (lfor [i v] (enumerate values)
        (if (and (isinstance v #(int float)) (not (isinstance v bool)))
            (float v)
            (fail "floats" f"element {i} must be a number, got {(describe v)}"))))


;; --- strings, output, sizes -----------------------------------------------------------------------------
(defn [primitive] string [value]
  "LispE's text of a value: strings as they are, ``true``/``false``/``nil``, numbers and lists as written.
  ``(string 3)`` ; => \"3\""
  (cond (isinstance value str) value
        (is value None) "nil"
        (isinstance value bool) (if value "true" "false")
        (isinstance value #(list tuple)) (+ "(" (.join " " (map string value)) ")")
        True (str value)))


(defn [primitive] println [#* values]
  "Prints the values separated by spaces, then a newline; returns nil."
  (print (.join " " (map string values)) :flush True)
  None)


(defn [primitive] size [value]
  "Number of elements of a string, list or dictionary; the first dimension of a tensor (1 for a scalar)."
  (cond (isinstance value torch.Tensor) (if (= value.ndim 0) 1 (get value.shape 0))
        (isinstance value #(str list tuple dict set)) (len value)
        True (fail "size" f"expects a string, list, dictionary or tensor, got {(describe value)}")))


(defn [primitive] push [container value]
  "Appends ``value`` to the list ``container`` and returns the list."
  (when (not (isinstance container list))
    (fail "push" f"expects a list, got {(describe container)}"))
  (.append container value)
  container)


;; --- files and JSON -------------------------------------------------------------------------------------
(defn [primitive] fwrite [path text]
  "Writes ``text`` to ``path`` atomically (a crash leaves the old file or the new one); returns true."
  (check-string "fwrite" "path" path)
  (check-string "fwrite" "text" text)
  (lispetorch.atomic.write-text path text)
  True)


(defn [primitive] fread [path]
  "The text of the file at ``path``."
  (check-string "fread" "path" path)
  (with [fh (open path :encoding "utf-8")]
    (.read fh)))


(defn _plain [value]
  (if (isinstance value torch.Tensor)
      (.tolist value)
      (raise (TypeError f"cannot write {(describe value)} as JSON"))))


(defn [primitive] json [value]
  "The JSON text of a value (tensors as nested lists). ``(json (dictionary \"a\" 1))`` ; => \"{\\\"a\\\": 1}\""
  (_json.dumps value :default _plain :ensure-ascii False))


(defn [primitive] json-parse [text]
  "The value of a JSON text; errors name the line and column."
  (check-string "json_parse" "text" text)
  (try
    (_json.loads text)
    (except [e _json.JSONDecodeError]
      (fail "json_parse" f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"))))


(defn [primitive] use [library]
  "``(use 'lispe_torch)``: LispE's library loading. The libraries' functions are already in scope here, so
  this only checks the name; returns true."
  (setv name (str library))
  (when (not-in name LIBRARIES)
    (fail "use" f"unknown library {(repr name)}; the libraries are {(.join ", " LIBRARIES)}"))
  True)


;; --- macros ---------------------------------------------------------------------------------------------
(defmacro setq [#* pairs]
  "``(setq name value)``: assignment."
  `(setv ~@pairs))


(defn _param [p]
  ;; LispE's optional parameter `(name default)` is Hy's `[name default]`.
  (if (isinstance p hy.models.Expression) (hy.models.List p) p))


(defmacro defun [name params #* body]
  "``(defun name(a b) body…)``: a function whose value is its last form."
  (when (not (isinstance params #(hy.models.Expression hy.models.List)))
    (raise (TypeError f"defun {name}: the parameters must be a parenthesised list, got {(hy.repr params)}")))
  `(defn ~name [~@(map _param params)] ~@body))


(defmacro check [condition #* body]
  "``(check condition body…)``: ``body`` when ``condition`` is true in LispE's sense, else nil."
  `(if (hy.I.lispetorch/lisp/lispe.truthy ~condition) (do ~@body) None))


(defmacro loopcount [n #* body]
  "``(loopcount n [i] body…)``: ``body`` ``n`` times, ``i`` from 0 to n-1."
  (if (and body (isinstance (get body 0) hy.models.Symbol) (> (len body) 1))
      `(for [~(get body 0) (range (hy.I.lispetorch/lisp/lispe.count ~n))] ~@(cut body 1 None))
      `(for [~(hy.gensym "i") (range (hy.I.lispetorch/lisp/lispe.count ~n))] ~@body)))


(defmacro loop [var collection #* body]
  "``(loop x collection body…)``: ``body`` for each element of ``collection``."
  `(for [~var ~collection] ~@body))


(defmacro block [#* body]
  "``(block body…)``: the forms in order; the value of the last."
  `(do ~@body))


(defmacro @ [container #* keys]
  "``(@ container key…)``: nested access (see ``at``); ``(@ t1 t2)`` with two tensors multiplies them."
  `(hy.I.lispetorch/lisp/lispe.at ~container ~@keys))


(defn count [n]
  "The repeat count of ``loopcount``: a non-negative integer."
  (if (and (isinstance n #(int float)) (not (isinstance n bool)) (or (isinstance n int) (.is-integer n)) (>= n 0))
      (int n)
      (fail "loopcount" f"expects a non-negative integer count, got {(describe n)}")))


(export :objects [nil true false truthy at == dictionary strings integers floats string println size push fwrite
                  fread json json-parse use]
        :macros [setq defun check loopcount loop block @])
