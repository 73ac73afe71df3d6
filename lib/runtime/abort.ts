import type { NativeCancelToken } from '../../typings/binding';
import { AbortError, InvalidArgumentError } from '../errors';
import { binding } from '../native/binding';

export function requireSignal(signal: unknown, argument = 'signal'): AbortSignal | undefined {
  if (signal === undefined) return undefined;
  if (!(signal instanceof AbortSignal)) throw InvalidArgumentError.of(argument, signal, 'an AbortSignal');
  return signal;
}

function abortErrorFor(signal: AbortSignal): AbortError {
  const reason: unknown = signal.reason;
  if (reason instanceof AbortError) return reason;
  return new AbortError('The operation was aborted', { cause: reason });
}

/**
 * Runs a native call that can be cancelled. The promise rejects with AbortError as soon as the
 * signal fires; the native task stops at its next check (before it starts, or between steps), and
 * whatever it still produces is handed to `discard`.
 */
export function withAbort<T>(
  signal: AbortSignal | undefined,
  run: (token: NativeCancelToken | undefined) => Promise<T>,
  discard: (late: T) => void = () => {},
): Promise<T> {
  if (!signal) return run(undefined);
  if (signal.aborted) return Promise.reject(abortErrorFor(signal));
  const token = new binding.NativeCancelToken();
  return new Promise<T>((resolve, reject) => {
    let settled = false;
    const onAbort = (): void => {
      token.cancel();
      if (!settled) {
        settled = true;
        reject(abortErrorFor(signal));
      }
    };
    signal.addEventListener('abort', onAbort, { once: true });
    run(token).then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        if (settled) discard(value);
        else {
          settled = true;
          resolve(value);
        }
      },
      (error: unknown) => {
        signal.removeEventListener('abort', onAbort);
        if (!settled) {
          settled = true;
          reject(error);
        }
      },
    );
  });
}
