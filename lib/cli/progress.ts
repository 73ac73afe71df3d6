// Progress on stderr for the CLI: on a terminal one status line redrawn in place (a bar, counts,
// rates), with messages printed above it; elsewhere (a pipe, a log file) plain lines only.

/** The stream the status goes to; process.stderr in the CLI. */
export interface StatusStream {
  write(text: string): boolean;
  isTTY?: boolean;
  columns?: number;
}

const CLEAR_LINE = '\r\x1b[K';
const SPINNER = '⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏';

/**
 * One status line. On a TTY `render(spinner, width)` (width: the columns it may use) is redrawn at most every `minRedrawMs` on update() and
 * every `tickMs` regardless (so elapsed time and the spinner move while nothing finishes);
 * log() prints a line above it. Off a TTY nothing is drawn: log() writes plain lines.
 */
export class StatusLine {
  readonly tty: boolean;
  readonly #stream: StatusStream;
  readonly #render: (spinner: string, width: number) => string;
  readonly #minRedrawMs: number;
  #timer: NodeJS.Timeout | undefined;
  #drawn = false;
  #lastDraw = 0;
  #frame = 0;
  #stopped = false;

  constructor(stream: StatusStream, render: (spinner: string, width: number) => string, options: { tty?: boolean; minRedrawMs?: number; tickMs?: number } = {}) {
    this.#stream = stream;
    this.#render = render;
    this.tty = options.tty ?? Boolean(stream.isTTY);
    this.#minRedrawMs = options.minRedrawMs ?? 100;
    if (this.tty) {
      this.#timer = setInterval(() => this.#draw(), options.tickMs ?? 250);
      this.#timer.unref();
    }
  }

  /** Redraws now if the last draw is older than minRedrawMs (or `force`). */
  update(force = false): void {
    if (!this.tty || this.#stopped) return;
    if (force || Date.now() - this.#lastDraw >= this.#minRedrawMs) this.#draw();
  }

  /** A line of its own: above the status line on a TTY, a plain line otherwise. */
  log(line: string): void {
    if (this.tty && this.#drawn) this.#stream.write(CLEAR_LINE);
    this.#stream.write(`${line}\n`);
    this.#drawn = false;
    if (this.tty && !this.#stopped) this.#draw();
  }

  /** Clears the status line before something else writes to the same terminal (stdout); redraw with update(true). */
  clear(): void {
    if (this.tty && this.#drawn) this.#stream.write(CLEAR_LINE);
    this.#drawn = false;
  }

  /** Stops redrawing; `keep` leaves the last status on screen (followed by a newline). */
  stop(keep = true): void {
    if (this.#stopped) return;
    if (this.tty) {
      this.#draw();
      this.#stream.write(keep ? '\n' : CLEAR_LINE);
    }
    this.#drawn = false;
    this.#stopped = true;
    if (this.#timer) clearInterval(this.#timer);
  }

  #draw(): void {
    if (this.#stopped) return;
    const width = Math.max(20, (this.#stream.columns || 80) - 1);
    const line = this.#render(SPINNER[this.#frame++ % SPINNER.length], width);
    // Never wider than the terminal: a wrapped line cannot be redrawn with \r.
    this.#stream.write(`${CLEAR_LINE}${[...line].slice(0, width).join('')}`);
    this.#drawn = true;
    this.#lastDraw = Date.now();
  }
}

/** `[██████░░░░]` for fraction 0..1, `width` cells between the brackets. */
export function bar(fraction: number, width = 24): string {
  const f = Math.min(1, Math.max(0, Number.isFinite(fraction) ? fraction : 0));
  const full = Math.round(f * width);
  return `[${'█'.repeat(full)}${'░'.repeat(width - full)}]`;
}

/** 1.5 kB, 15.2 GB (decimal units, as disk sizes are sold and as `ls -h --si` shows). */
export function formatBytes(bytes: number): string {
  if (bytes < 1000) return `${bytes} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = -1;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit++;
  }
  return `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

/** 0:07, 12:34, 1:02:03. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return '--:--';
  const total = Math.round(ms / 1000);
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${String(s).padStart(2, '0')}` : `${m}:${String(s).padStart(2, '0')}`;
}

/** 1,234,567 */
export function formatCount(n: number): string {
  return n.toLocaleString('en-US');
}

/** `text` with `{bar}` replaced by a bar that fills the line up to `width` (10 to 30 cells). */
export function withBar(text: string, fraction: number, width: number): string {
  const room = width - [...text].length + '{bar}'.length - 2;
  return text.replace('{bar}', bar(fraction, Math.max(10, Math.min(30, room))));
}
