"""Model I/O: every way bfc reads, holds, writes and runs a model, and nothing else (no graph algebra).

The forms of a model, one name each (the stages above never convert between them themselves):

* **model file** -- an ``.onnx`` path and the external-data files it references
  (``files.input_files``); opened checked by ``files.open_skeleton``, written atomically by
  ``files.save_model``, copied byte for byte by ``files.copy_model_files``.
* **skeleton** -- an ``onnx.ModelProto`` whose big initializers are references into a model file,
  with its **base** (the file the references are relative to): ``stream.read_skeleton`` parses one,
  ``stream.write_model`` writes one tensor by tensor, ``stream.materialize`` turns it into a full model.
* **full model** -- an ``onnx.ModelProto`` that holds its weights (``files.load_model``,
  ``stream.materialize``; a ModelProto given to ``bfc.optimize``).
* **graph** -- a graphsurgeon graph whose referenced weights stay lazy (``stream.import_graph``).
* **lazy weight** -- ``stream.LazyArray``: a weight read from its file when used.
* **feeds** -- the model's inputs, from a calibration ``.npz`` or generated (``feeds``).
* **session** -- an onnxruntime session on any of the forms above (``session.session``, ``session.run``);
  ``measure.measure_file`` runs a model file in a fresh process for resident bytes and latency.

Modules: ``files`` (open/save/copy, versions, output-path checks), ``stream`` (skeletons, lazy weights,
streaming writes, the one subgraph walk ``graphs``), ``feeds``, ``session``, ``measure``.
"""
