// One owner for the number rules of options and config fields: what counts as an integer (a safe
// integer in range) and how a range reads in an error. Callers keep their own error type (a JS
// argument, a config file, an HTTP body); the rule and its wording live here.

import { InvalidArgumentError } from './errors';

/** `v` is a safe integer in [min, max]. */
export function isInteger(v: unknown, min = Number.MIN_SAFE_INTEGER, max = Number.MAX_SAFE_INTEGER): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= min && v <= max;
}

/** "an integer >= min", or "an integer from min to max". */
export function integerRange(min: number, max = Number.MAX_SAFE_INTEGER): string {
  return max === Number.MAX_SAFE_INTEGER ? `an integer >= ${min}` : `an integer from ${min} to ${max}`;
}

/** `value` as an integer in [min, max], else an InvalidArgumentError naming `name` and `expected` (default: the range). */
export function integer(name: string, value: unknown, min: number, max = Number.MAX_SAFE_INTEGER, expected = integerRange(min, max)): number {
  if (!isInteger(value, min, max)) throw InvalidArgumentError.of(name, value, expected);
  return value;
}

/** `value` as a finite number passing `check`, else an InvalidArgumentError naming `name` and `expected`. */
export function finite(name: string, value: unknown, check: (v: number) => boolean, expected: string): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || !check(value)) throw InvalidArgumentError.of(name, value, expected);
  return value;
}
