import type { NativeStats } from '../../typings/binding';
import { binding } from '../native/binding';

/** Counters of the runtime (see stats()). */
export type RuntimeStats = NativeStats;

/**
 * Process-wide counters of the native runtime: live tensors, bytes copied between host and
 * devices, KV-cache allocations, generated tokens. Handy for leak checks and for proving that a
 * decoding loop stays on the device.
 */
export function stats(): RuntimeStats {
  return binding.stats();
}
