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

/** The values an integer dtype holds (int64 as bigints; bool is not an integer dtype here). */
export const INTEGER_RANGES = {
  int8: [-128n, 127n],
  uint8: [0n, 255n],
  int16: [-32768n, 32767n],
  int32: [-2147483648n, 2147483647n],
  int64: [-(2n ** 63n), 2n ** 63n - 1n],
} as const satisfies Partial<Record<DType, readonly [bigint, bigint]>>;

export type IntegerDType = keyof typeof INTEGER_RANGES;

export function isIntegerDType(dtype: DType): dtype is IntegerDType {
  return dtype in INTEGER_RANGES;
}

function rangeText(dtype: IntegerDType): string {
  const [lo, hi] = INTEGER_RANGES[dtype];
  return dtype === 'int64' ? 'integers from -2^63 to 2^63-1' : `integers from ${lo} to ${hi}`;
}

/**
 * Whether `value` is a value of integer dtype `dtype` once cast as libtorch casts: a bigint, or a
 * number whose fraction `truncate` allows dropping (toward zero). NaN and infinities fit none.
 */
export function fitsInteger(value: number | bigint, dtype: IntegerDType, truncate: boolean): boolean {
  const [lo, hi] = INTEGER_RANGES[dtype];
  if (typeof value === 'bigint') return value >= lo && value <= hi;
  if (!Number.isFinite(value) || (!truncate && !Number.isInteger(value))) return false;
  const whole = Math.trunc(value);
  // Numbers compare exactly with bigints, so 2^63 (a double) is correctly outside int64.
  return whole >= lo && whole <= hi;
}

/**
 * The error for item `index` of `argument` that does not fit `dtype`. `position` names nested
 * items ("[1][2]").
 */
export function valueError(argument: string, index: number, value: unknown, dtype: DType, position = ''): DTypeError {
  const expected = isIntegerDType(dtype) ? rangeText(dtype) : `${dtype} values`;
  const shown = typeof value === 'bigint' ? `${value}n` : String(value);
  return new DTypeError(
    `argument '${argument}' has item ${index}${position ? ` (${argument}${position})` : ''} = ${shown}, which does not fit dtype '${dtype}' (${expected})`,
    { argument, value: shown, expected, index },
  );
}

/**
 * Converts a plain JS array to the typed array that holds `dtype`; the native side casts float64
 * to the target. Values the target cannot hold exactly are rejected (a C++ cast would wrap 300 to
 * 44 in int8, or make NaN an arbitrary integer). `position(i)` names item i of nested data.
 */
export function typedArrayFromList(
  list: readonly unknown[], dtype: DType | undefined, argument: string, position: (i: number) => string = () => '',
): { data: TensorTypedArray; dtype: DType } {
  const first = list.length > 0 ? list[0] : undefined;
  const resolved: DType = dtype ?? (typeof first === 'bigint' ? 'int64' : typeof first === 'boolean' ? 'bool' : 'float32');
  const bad = (i: number): never => {
    throw valueError(argument, i, list[i], resolved, position(i));
  };
  switch (resolved) {
    case 'int64': {
      const out = new BigInt64Array(list.length);
      list.forEach((v, i) => {
        // Numbers beyond 2^53 are not exact integers any more: ask for bigints there.
        if (typeof v === 'bigint' && fitsInteger(v, 'int64', false)) out[i] = v;
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
      const integer = isIntegerDType(resolved) ? resolved : undefined;
      const out = new Float64Array(list.length);
      list.forEach((v, i) => {
        if (typeof v !== 'number' && typeof v !== 'bigint') bad(i);
        if (integer && !fitsInteger(v as number | bigint, integer, false)) bad(i);
        out[i] = Number(v);
      });
      // float64 carries every JS number (and every value of the narrower integer dtypes) exactly.
      return { data: out, dtype: resolved };
    }
  }
}
