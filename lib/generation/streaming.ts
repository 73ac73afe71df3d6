// Text deltas of a generation as it happens, for onToken and generateStream: token ids go in as
// decoding steps produce them, text comes out as soon as it is final. Byte-level BPE splits UTF-8
// characters across tokens; decoding a prefix then ends in U+FFFD, so text is held back until the
// character is complete (or the sequence ends), and a delta never ends inside a character.

/** Decodes token ids to text (the model's tokenizer, special tokens skipped). */
export type DecodeFn = (ids: number[]) => string;

/** One sequence's new tokens and the text they completed (may be ''), for onToken and generateStream. */
export interface TokenDelta {
  /** Which sequence of the call (row of `sequences`): 0 for a one-image call. */
  sequence: number;
  /** The new token ids of this step (one per step while decoding; none on the final flush). */
  tokenIds: number[];
  /** Text that became final with these tokens; UTF-8 safe across token boundaries. */
  text: string;
}

export class TextStreamer {
  readonly #decode: DecodeFn;
  readonly #ids = new Map<number, number[]>();
  readonly #emitted = new Map<number, string>();

  constructor(decode: DecodeFn) {
    this.#decode = decode;
  }

  /** Appends `tokenIds` to `sequence` and returns the delta to report. */
  push(sequence: number, tokenIds: number[]): TokenDelta {
    const ids = this.#ids.get(sequence) ?? [];
    ids.push(...tokenIds);
    this.#ids.set(sequence, ids);
    return { sequence, tokenIds, text: this.#advance(sequence, false) };
  }

  /** The text still held back, per sequence that has any (call when the generation ends). */
  flush(): TokenDelta[] {
    const out: TokenDelta[] = [];
    for (const sequence of this.#ids.keys()) {
      const text = this.#advance(sequence, true);
      if (text) out.push({ sequence, tokenIds: [], text });
    }
    return out;
  }

  #advance(sequence: number, final: boolean): string {
    const full = this.#decode(this.#ids.get(sequence) ?? []);
    const emitted = this.#emitted.get(sequence) ?? '';
    // An incomplete character decodes as U+FFFD at the end: wait for its other bytes.
    if (!final && full.endsWith('\uFFFD')) return '';
    // A later token can rewrite earlier text (a tokenizer's clean-up of spaces); say only what
    // extends what was already said.
    if (!full.startsWith(emitted)) return '';
    this.#emitted.set(sequence, full);
    return full.slice(emitted.length);
  }
}
