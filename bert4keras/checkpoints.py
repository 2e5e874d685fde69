"""Checkpoint file I/O: Google TF checkpoints and HuggingFace safetensors.

Both formats are read into a name -> numpy array view. Names are the
checkpoint's own; translating HuggingFace names to Google names is done by the
model family (see `bert4keras.models`), next to its variable mapping.
TensorFlow is imported only here, and only when a TF checkpoint is touched.
"""
import json
import os

import numpy as np

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path):
    """Reads a .safetensors file into {name: float32/int numpy array}.

    bfloat16 tensors are widened to float32 (numpy has no bfloat16).
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(raw, dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: numpy array} to a .safetensors file."""
    inverse = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        raw = array.tobytes()
        header[name] = {
            "dtype": inverse[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for raw in chunks:
            f.write(raw)


def find_tf_checkpoint(path):
    """The prefix of a Google TF checkpoint given a prefix, an index file or a folder."""
    path = os.fspath(path)
    if path.endswith(".index"):
        path = path[: -len(".index")]
    if os.path.exists(path + ".index"):
        return path
    if os.path.isdir(path):
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(path)
        if latest:
            return latest
        candidates = sorted(f[:-6] for f in os.listdir(path) if f.endswith(".index"))
        if candidates:
            return os.path.join(path, candidates[0])
    return None


def find_safetensors(path):
    """The .safetensors files of a file path or an HF model folder."""
    path = os.fspath(path)
    if path.endswith(".safetensors") and os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, name) for name in files]
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(single):
            return [single]
    return []


class GoogleCheckpoint:
    """Read access to a Google-original TF checkpoint (bert_model.ckpt)."""

    format = "google"

    def __init__(self, prefix):
        import tensorflow as tf

        self.path = prefix
        self._reader = tf.train.load_checkpoint(prefix)
        self._shapes = self._reader.get_variable_to_shape_map()

    def names(self):
        return list(self._shapes)

    def __contains__(self, name):
        return name in self._shapes

    def shape(self, name):
        return tuple(self._shapes[name])

    def __getitem__(self, name):
        return np.asarray(self._reader.get_tensor(name))


class DictCheckpoint:
    """A name -> array mapping that quacks like a checkpoint (HF weights after renaming)."""

    format = "dict"

    def __init__(self, tensors, path="<memory>"):
        self.path = path
        self._tensors = tensors

    def names(self):
        return list(self._tensors)

    def __contains__(self, name):
        return name in self._tensors

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def __getitem__(self, name):
        return self._tensors[name]


def open_checkpoint(path):
    """Opens a Google checkpoint, returning None if `path` holds none."""
    prefix = find_tf_checkpoint(path)
    return GoogleCheckpoint(prefix) if prefix else None


def save_tf_checkpoint(prefix, tensors):
    """Writes {google_name: numpy array} as a Google-format TF checkpoint.

    The files are `prefix.index` and `prefix.data-00000-of-00001`, plus the
    `checkpoint` state file, so `tf.train.load_checkpoint`,
    `tf.train.latest_checkpoint` and TF1's `init_from_checkpoint` all read them.
    """
    import tensorflow as tf

    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    values = [tf.constant(np.asarray(tensors[name])) for name in names]
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=values,
    )
    base = os.path.basename(prefix)
    with open(os.path.join(folder, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n')
    return prefix
