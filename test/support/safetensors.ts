// A tiny reader of the safetensors format (u64-LE header length, JSON header, raw little-endian
// data) for the reference fixtures. Test support only.
import * as fs from 'node:fs';

export type SafeDType = 'F32' | 'F64' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';

export interface SafeTensor {
  dtype: SafeDType;
  shape: number[];
  /** A copy of the tensor's bytes as the matching typed array (F16/BF16 as Uint16Array bits, BOOL as Uint8Array). */
  data: Float32Array | Float64Array | Uint16Array | BigInt64Array | Int32Array | Int16Array | Int8Array | Uint8Array;
}

interface Entry {
  dtype: SafeDType;
  shape: number[];
  data_offsets: [number, number];
}

const ELEMENT_BYTES: Record<SafeDType, number> = { F32: 4, F64: 8, F16: 2, BF16: 2, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

export class SafeTensorsFile {
  readonly names: string[];
  readonly metadata: Record<string, string>;
  readonly #buffer: Buffer;
  readonly #dataStart: number;
  readonly #entries: Record<string, Entry>;

  constructor(path: string) {
    this.#buffer = fs.readFileSync(path);
    const headerLength = Number(this.#buffer.readBigUInt64LE(0));
    const header = JSON.parse(this.#buffer.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, unknown>;
    this.#dataStart = 8 + headerLength;
    this.metadata = (header.__metadata__ ?? {}) as Record<string, string>;
    delete header.__metadata__;
    this.#entries = header as Record<string, Entry>;
    this.names = Object.keys(header).sort();
  }

  has(name: string): boolean {
    return name in this.#entries;
  }

  get(name: string): SafeTensor {
    const entry = this.#entries[name];
    if (!entry) throw new Error(`no tensor '${name}' in the safetensors file`);
    const [begin, end] = entry.data_offsets;
    const numel = entry.shape.reduce((a, b) => a * b, 1);
    if (end - begin !== numel * ELEMENT_BYTES[entry.dtype]) throw new Error(`tensor '${name}': byte range does not match its shape`);
    // Copy so the typed array is aligned whatever the offset in the file.
    const bytes = new Uint8Array(this.#buffer.subarray(this.#dataStart + begin, this.#dataStart + end));
    const ab = bytes.buffer;
    const data = (() => {
      switch (entry.dtype) {
        case 'F32': return new Float32Array(ab);
        case 'F64': return new Float64Array(ab);
        case 'F16':
        case 'BF16': return new Uint16Array(ab);
        case 'I64': return new BigInt64Array(ab);
        case 'I32': return new Int32Array(ab);
        case 'I16': return new Int16Array(ab);
        case 'I8': return new Int8Array(ab);
        case 'U8':
        case 'BOOL': return bytes;
      }
    })();
    return { dtype: entry.dtype, shape: entry.shape, data };
  }
}
