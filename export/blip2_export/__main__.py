"""CLI: python -m blip2_export <hf-dir> <out-dir> [--dtype float32|float16|bfloat16] [--max-length N]
                                [--max-encoder-length N]

Exit status 0 on success; 2 with one line `error: ...` on stderr when the input is at fault
(unsupported architecture, missing/corrupt files, bad options); 1 with a traceback on a bug.
Progress lines (`progress: ...`) go to stderr.
"""

import argparse
import os
import sys

from .errors import ExportError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    if argv is None and os.environ.get("PYTHONHASHSEED") != "0":
        # TorchScript lays out class attributes in set order, i.e. by Python's string hash, so
        # byte-identical exports need a fixed hash seed: run again with one.
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, "-m", "blip2_export", *sys.argv[1:]], env)
    parser = _Parser(prog="python -m blip2_export",
                     description="Export a Hugging Face BLIP-2 checkpoint folder to a blip2-node model folder.")
    parser.add_argument("hf_dir", help="checkpoint folder (config.json + weights)")
    parser.add_argument("out_dir", help="model folder to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of parameters, activations and KV cache (default float32)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest sequence a cache slot holds: OPT image tokens + prompt + new tokens "
                             "(default: max_position_embeddings); T5 decoder start + new tokens (default 512)")
    parser.add_argument("--max-encoder-length", type=int, default=None,
                        help="T5 only: longest encoder input, image tokens + prompt (default 512)")
    args = parser.parse_args(argv)
    if args.max_length is not None and args.max_length < 1:
        parser.error("--max-length must be a positive integer")
    if args.max_encoder_length is not None and args.max_encoder_length < 1:
        parser.error("--max-encoder-length must be a positive integer")

    from .exporter import export  # imports torch: after argument errors are reported

    try:
        export(args.hf_dir, args.out_dir, dtype=args.dtype, max_length=args.max_length,
               max_encoder_length=args.max_encoder_length)
    except ExportError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory while exporting", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
