"""A small carry copy of a folder of videos: each clip re-encoded (H.264 through PyAV) at a
reduced size, so real video travels to a device host inside its carry budget (issue 18:
``benchmarks/issue18_gpu.sh`` streams ``.devdata/videos`` beside the 7-Scenes frames).

    python benchmarks/carry_videos.py [--src ../shared/data/videos] [--out .devdata/videos] \\
        [--width 320] [--min-height 180] [--max-mb 4] [--max-frames 0] [--clips a.mp4 b.mp4]

Each clip is scaled to ``--width`` pixels wide, unless that leaves it less than
``--min-height`` tall (a wide clip: then to ``--min-height`` tall), never up, to even sizes,
keeping its frame rate and frame count (or its first ``--max-frames``). Clips are taken in
name order (or the ``--clips`` order) while the copies stay under ``--max-mb`` in total; a clip
that would go over is left out with a message. Rotation and audio are dropped. The copy is a
different file from the original (smaller frames, another codec and GOP), so its decode figures
are not the original's: measure decoding on the originals (``benchmarks/decode.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".ts", ".m4v", ".mpg", ".mpeg"}


def target_size(width: int, height: int, *, out_width: int, min_height: int) -> tuple[int, int]:
    """(width, height) of the copy: ``out_width`` wide, or ``min_height`` tall when that is
    larger, never above the source, even numbers (H.264 4:2:0), aspect kept to a pixel."""
    scale = min(1.0, max(out_width / width, min_height / height))
    w, h = max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
    return min(w, width - width % 2), min(h, height - height % 2)


def downsample(src: Path, dst: Path, *, out_width: int = 320, min_height: int = 180, max_frames: int = 0,
               crf: int = 23) -> dict:
    """Re-encode ``src`` into ``dst`` (H.264, yuv420p); returns what was written."""
    import av

    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        stream.thread_type = "AUTO"
        w, h = target_size(stream.codec_context.width, stream.codec_context.height, out_width=out_width,
                           min_height=min_height)
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        rate = Fraction(rate).limit_denominator(1001)
        frames = 0
        with av.open(str(dst), "w") as out:
            enc = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=rate)
            enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
            if enc.codec_context.name == "libx264":
                enc.options = {"crf": str(crf), "preset": "medium"}
            for frame in inp.decode(stream):
                img = frame.reformat(width=w, height=h, format="yuv420p")
                img.pts, img.time_base = frames, 1 / rate
                for packet in enc.encode(img):
                    out.mux(packet)
                frames += 1
                if max_frames and frames >= max_frames:
                    break
            for packet in enc.encode():
                out.mux(packet)
    return {"src": src.name, "file": dst.name, "size": [w, h], "frames": frames, "fps": float(rate),
            "bytes": dst.stat().st_size, "src_bytes": src.stat().st_size}


def carry_copy(src: Path, out: Path, *, out_width: int = 320, min_height: int = 180, max_mb: float = 4.0,
               max_frames: int = 0, clips: list[str] | None = None, log=print) -> list[dict]:
    """Downsampled copies of the videos in ``src`` (name order, or ``clips``) into ``out`` while
    the copies total at most ``max_mb`` MB; returns one row per copy written."""
    files = ([src / c for c in clips] if clips else
             sorted(p for p in src.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES))
    out.mkdir(parents=True, exist_ok=True)
    rows, total = [], 0
    for f in files:
        dst = out / (f.stem + ".mp4")
        try:
            row = downsample(f, dst, out_width=out_width, min_height=min_height, max_frames=max_frames)
        except Exception as err:  # one unreadable clip does not stop the copy
            dst.unlink(missing_ok=True)
            log(f"{f.name}: skipped ({type(err).__name__}: {err})")
            continue
        if total + row["bytes"] > max_mb * 1e6:
            dst.unlink()
            log(f"{f.name}: left out ({row['bytes'] / 1e6:.2f} MB would pass --max-mb {max_mb:g})")
            continue
        total += row["bytes"]
        rows.append(row)
        log(f"{f.name} -> {dst.name}: {row['size'][0]}x{row['size'][1]}, {row['frames']} frames at "
            f"{row['fps']:.2f} fps, {row['bytes'] / 1e6:.2f} MB (was {row['src_bytes'] / 1e6:.2f} MB)")
    (out / "carry_videos.json").write_text(json.dumps(rows, indent=1))
    log(f"{len(rows)} clip(s), {total / 1e6:.2f} MB in {out}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path("../shared/data/videos"))
    ap.add_argument("--out", type=Path, default=Path(".devdata/videos"))
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--min-height", type=int, default=180,
                    help="a wide clip is scaled to this height instead (at least the streamer's 168)")
    ap.add_argument("--max-mb", type=float, default=4.0, help="total size of the copies")
    ap.add_argument("--max-frames", type=int, default=0, help="first frames of each clip (0: all)")
    ap.add_argument("--clips", nargs="+", default=None, help="file names in --src (default: every video)")
    args = ap.parse_args()
    if not args.src.is_dir():
        print(f"{args.src}: no such folder", file=sys.stderr)
        return 1
    rows = carry_copy(args.src, args.out, out_width=args.width, min_height=args.min_height, max_mb=args.max_mb,
                      max_frames=args.max_frames, clips=args.clips)
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
