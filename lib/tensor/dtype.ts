import type { NativeDType } from '../../typings/binding';
import { DTypeError, InvalidArgumentError } from '../errors';

/** A tensor element type: 'float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'int16', 'int8', 'uint8' or 'bool'. */
export type DType = NativeDType;

export const DTYPES: readonly DType[] = ['float32', 'float16', 'bfloat16', 'float64', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool'];

/** What toArray() returns for each dtype (half precision as raw Uint16 bits, bool as 0/1 bytes). */
export interface TypedArrayOf {
  float32: Float32Array;
  float16: Uint16Array;
  bfloat16: Uint16Array;
  float64: Float64Array;
  int64: BigInt64Array;
  int32: Int32Array;
  int16: Int16Array;
  int8: Int8Array;
  uint8: Uint8Array;
  bool: Uint8Array;
}

/** Any typed array a tensor reads back to (see TypedArrayOf). */
export type TensorTypedArray = TypedArrayOf[DType];

export function requireDType(value: unknown, argument: string): DType {
  if (typeof value !== 'string' || !(DTYPES as readonly string[]).includes(value)) {
    throw InvalidArgumentError.of(argument, value, `one of ${DTYPES.join(', ')}`);
  }
  return value as DType;
}

/** Converts a plain JS array to the typed array that holds `dtype` (numeric conversion is done natively). */
export function typedArrayFromList(list: readonly unknown[], dtype: DType | undefined, argument: string): { data: TensorTypedArray; dtype: DType } {
  const first = list.length > 0 ? list[0] : undefined;
  const resolved: DType = dtype ?? (typeof first === 'bigint' ? 'int64' : typeof first === 'boolean' ? 'bool' : 'float32');
  const bad = (i: number): never => {
    throw new DTypeError(`argument '${argument}' has item ${i} = ${String(list[i])}, which does not fit dtype '${resolved}'`, {
      argument,
      value: String(list[i]),
      expected: `${resolved} values`,
    });
  };
  switch (resolved) {
    case 'int64': {
      const out = new BigInt64Array(list.length);
      list.forEach((v, i) => {
        if (typeof v === 'bigint') out[i] = v;
        else if (typeof v === 'number' && Number.isSafeInteger(v)) out[i] = BigInt(v);
        else bad(i);
      });
      return { data: out, dtype: resolved };
    }
    case 'bool': {
      const out = new Uint8Array(list.length);
      list.forEach((v, i) => {
        if (typeof v === 'boolean' || v === 0 || v === 1) out[i] = v ? 1 : 0;
        else bad(i);
      });
      return { data: out, dtype: resolved };
    }
    default: {
      const out = new Float64Array(list.length);
      list.forEach((v, i) => {
        if (typeof v === 'number') out[i] = v;
        else if (typeof v === 'bigint') out[i] = Number(v);
        else bad(i);
      });
      const integer = resolved.startsWith('int') || resolved === 'uint8';
      if (integer) {
        out.forEach((v, i) => {
          if (!Number.isInteger(v)) bad(i);
        });
      }
      // float64 carries every JS number exactly; the native side casts to the target dtype.
      return { data: out, dtype: resolved };
    }
  }
}
