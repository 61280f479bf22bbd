"""Host-side cost of writing one logged step to TensorBoard event files (`SummaryWriter`).

Two shapes of a step, as `GradientMonitor` writes them:

- `flat`: one event of `--tags` scalars into the run (`gradients/raw/norm/<layer>` ...);
- `per-layer`: `--layers` layers, each layer's two statistics (norm, update ratio) in a
  run of its own (`train/<layer>`, what `assign_runs` does for per-group series), plus
  the global numbers in the run itself.

With this version's writer also: the per-layer steps written in batches of
`--batch` (`SummaryWriter.batch()`, as a monitor writes the steps its ring held:
each file flushed once per batch) and with `flush_seconds=1`.

Each configuration writes `--warmup` steps (the first write of a tag set goes through
protobuf, with descriptions), then `--steps` timed steps; the median of `--repeats`
repeats of the mean per-step CPU time (user + system: a shared machine's load
does not count) is printed, in milliseconds, with the CRC32C
implementation in use (`google-crc32c` or TensorBoard's pure-Python one).

    python benchmarks/writer.py [--tags 214] [--layers 105] [--steps 400] [--repeats 5]
"""

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time

from gradmon import tags
from gradmon.publish.writer import SummaryWriter

try:
    from gradmon.publish import record
except ImportError:  # an older gradmon: TensorFlow's record writer
    record = None


def flat_steps(count):
    names = [tags.group_stat(tags.RAW, "norm", f"layer_{i}") for i in range(count)]
    return (lambda step: [{name: step + i / 7 for i, name in enumerate(names)}]), {}


def per_layer_steps(layers):
    runs, names = {}, []
    for i in range(layers):
        layer = f"layer_{i}"
        for tag in (tags.group_stat(tags.RAW, "norm", layer), tags.update_ratio(layer)):
            runs[tag] = tags.group_run(layer)
            names.append(tag)
    names += [tags.global_norm(tags.RAW), tags.CLIP_RATIO, tags.NO_GRADIENT]
    return (lambda step: [{name: step + i / 7 for i, name in enumerate(names)}]), runs


def time_writer(make_steps, steps, warmup, flush_seconds=None, batch=1):
    directory = tempfile.mkdtemp(prefix="gradmon-writer-bench-")
    try:
        step_mappings, runs = make_steps
        options = {} if flush_seconds is None else {"flush_seconds": flush_seconds}
        writer = SummaryWriter(directory, **options).open()
        writer.assign_runs(runs)
        for step in range(warmup):
            for mapping in step_mappings(step):
                writer.write_scalars(step, mapping)
        start = time.process_time()
        for first in range(warmup, warmup + steps, batch):
            with writer.batch() if batch > 1 else contextlib.nullcontext():
                for step in range(first, min(first + batch, warmup + steps)):
                    for mapping in step_mappings(step):
                        writer.write_scalars(step, mapping)
        elapsed = time.process_time() - start
        writer.close()
        return elapsed / steps * 1e3
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=214, help="scalars per step in the flat run (default 214)")
    parser.add_argument("--layers", type=int, default=105, help="layers of the per-layer run (default 105)")
    parser.add_argument("--steps", type=int, default=400, help="timed steps per repeat (default 400)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats; the median is shown (default 5)")
    parser.add_argument("--batch", type=int, default=16,
                        help="logged steps per batch (`SummaryWriter.batch`), as an observer's ring "
                             "read back at once (default 16)")
    args = parser.parse_args()
    if record is None:
        crc = "TensorFlow's TFRecordWriter (C++)"
    else:
        crc = "google-crc32c" if record.FAST else "TensorBoard's pure-Python CRC32C"
    print(f"record writer: {crc}")
    configs = [(f"flat, {args.tags} scalars", flat_steps(args.tags), None),
               (f"per-layer, {args.layers} layers x 2 + 3 global", per_layer_steps(args.layers), None)]
    configs = [(label, make, None, 1) for label, make, _ in configs]
    if hasattr(SummaryWriter, "batch"):
        configs += [(f"per-layer, batches of {args.batch} steps", per_layer_steps(args.layers), None, args.batch),
                    ("per-layer, flush_seconds=1", per_layer_steps(args.layers), 1.0, 1)]
    for label, make, flush_seconds, batch in configs:
        times = [time_writer(make, args.steps, args.warmup, flush_seconds, batch) for _ in range(args.repeats)]
        print(f"{label:<40} {statistics.median(times):8.3f} ms CPU per logged step "
              f"(min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
