import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { InvalidArgumentError } from '../errors';
import { binding, packageRoot } from '../native/binding';
import { integerRange, isInteger } from '../validation';

/** Devices this process can use: 'cpu' and one 'cuda:N' per visible GPU (with a CUDA build of libtorch). */
export function devices(): string[] {
  return binding.devices();
}

/** True when at least one CUDA device can be used. */
export function cudaAvailable(): boolean {
  return binding.devices().some((d) => d.startsWith('cuda'));
}

/** The versions of this package and of what it runs on (see `versions`). */
export interface Versions {
  /** This package. */
  package: string;
  /** The libtorch the addon was compiled against. */
  libtorch: string;
  /** The CUDA runtime libtorch uses, or null for a CPU-only libtorch. */
  cuda: string | null;
  /** The instruction set of the runtime's CPU product kernel ('avx512', 'avx2'; 'none': libtorch's only). */
  linearKernel: 'avx512' | 'avx2' | 'none';
  /** Whether libtorch has oneDNN's matmul, the other product path timed at load (see `linearKernels`). */
  onednnLinear: boolean;
  /** Whether the addon was compiled against a CUDA libtorch (it may still find no GPU). */
  builtWithCuda: boolean;
}

/** This package's version, the libtorch and CUDA it runs on, and the CPU kernel in use. */
export const versions: Versions = (() => {
  const native = binding.versions();
  const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot(), 'package.json'), 'utf8')) as { version: string };
  return Object.freeze({ package: pkg.version, libtorch: native.libtorch, cuda: native.cuda, linearKernel: native.linearKernel, onednnLinear: native.onednnLinear, builtWithCuda: native.builtWithCuda });
})();

/**
 * Sets libtorch's intra-op CPU threads (the CPU executor's thread pool); resolves to the count in
 * effect. At most `os.availableParallelism()`: intra-op threads beyond the cores this process may
 * use only take turns on them, and every parallel kernel then waits for its slowest, descheduled
 * thread (1024 threads on 2 cores made inference 45x slower).
 */
export function setNumThreads(threads: number): Promise<number> {
  const cores = os.availableParallelism();
  if (!isInteger(threads, 1, cores)) {
    return Promise.reject(InvalidArgumentError.of('threads', threads, `${integerRange(1, cores)} (os.availableParallelism())`));
  }
  return binding.setNumThreads(threads);
}

/** libtorch's intra-op CPU threads in effect (see setNumThreads). */
export function getNumThreads(): Promise<number> {
  return binding.getNumThreads();
}

/** Checks the form of a device string here; availability is checked natively with a DeviceError. */
export function requireDeviceString(device: unknown, argument: string): string {
  if (typeof device !== 'string' || !/^(cpu|cuda(:\d+)?)$/.test(device)) {
    throw InvalidArgumentError.of(argument, device, "'cpu', 'cuda' or 'cuda:N'");
  }
  return device;
}
