import { strict as assert } from 'node:assert';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  Blip2ForConditionalGeneration,
  DTypeError,
  DeviceError,
  DisposedError,
  InvalidArgumentError,
  ShapeError,
  Tensor,
  cudaAvailable,
  devices,
  getNumThreads,
  liveTensorCount,
  setNumThreads,
  stats,
  versions,
} from '../lib';

import { gcAvailable, settleFinalizers } from './support/gc';

describe('Tensor', () => {
  describe('round trips (one copy in, one copy out)', () => {
    const cases: Array<{ dtype: string; data: ArrayBufferView & { length: number } }> = [
      { dtype: 'float32', data: new Float32Array([1.5, -2, 3.25, 0, Number.MAX_VALUE / 1e300, -0]) },
      // float16 bits: 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal), +inf, NaN
      { dtype: 'float16', data: new Uint16Array([0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00, 0x7e00]) },
      // bfloat16 bits: 1.0, -2.0, max, smallest subnormal, +inf, NaN
      { dtype: 'bfloat16', data: new Uint16Array([0x3f80, 0xc000, 0x7f7f, 0x0001, 0x7f80, 0x7fc0]) },
      { dtype: 'float64', data: new Float64Array([Math.PI, -1e300, 5e-324, 0, 1, 2]) },
      { dtype: 'int64', data: new BigInt64Array([0n, -1n, 9007199254740993n, -(2n ** 63n), 2n ** 63n - 1n, 42n]) },
      { dtype: 'int32', data: new Int32Array([0, -1, 2147483647, -2147483648, 7, 8]) },
      { dtype: 'int16', data: new Int16Array([0, -1, 32767, -32768, 7, 8]) },
      { dtype: 'int8', data: new Int8Array([0, -1, 127, -128, 7, 8]) },
      { dtype: 'uint8', data: new Uint8Array([0, 1, 127, 128, 254, 255]) },
      { dtype: 'bool', data: new Uint8Array([0, 1, 1, 0, 1, 0]) },
    ];
    for (const { dtype, data } of cases) {
      it(`${dtype}: data, shape, dtype and device survive`, async () => {
        const t = Tensor.from(data, [2, 3], { dtype: dtype as never });
        assert.deepEqual(t.shape, [2, 3]);
        assert.equal(t.dtype, dtype);
        assert.equal(t.device, 'cpu');
        const back = await t.toArray();
        assert.equal(back.constructor, data.constructor);
        assert.deepEqual(Array.from(back as ArrayLike<unknown>), Array.from(data as unknown as ArrayLike<unknown>));
        assert.equal(t.nbytes, data.byteLength);
        t.dispose();
      });
    }

    it('copies on the way in: changing the source array later does not change the tensor', async () => {
      const source = new Float32Array([1, 2, 3]);
      const t = Tensor.from(source);
      source[0] = 100;
      assert.deepEqual(await t.toList(), [1, 2, 3]);
    });

    it('respects byteOffset of typed array views and Buffers', async () => {
      const backing = new Float32Array([9, 9, 1, 2, 3, 9]);
      const view = new Float32Array(backing.buffer, 8, 3);
      assert.deepEqual(await Tensor.from(view).toList(), [1, 2, 3]);
      const buf = Buffer.from([7, 8, 9, 10]).subarray(1, 3);
      const u8 = Tensor.from(buf);
      assert.equal(u8.dtype, 'uint8');
      assert.deepEqual(await u8.toList(), [8, 9]);
    });

    it('infers shape and dtype from nested JS arrays', async () => {
      const t = Tensor.from([[1, 2, 3], [4, 5, 6]]);
      assert.deepEqual(t.shape, [2, 3]);
      assert.equal(t.dtype, 'float32');
      const ids = Tensor.from([[1, 2], [3, 4]], undefined, { dtype: 'int64' });
      assert.deepEqual(await ids.toList(), [1n, 2n, 3n, 4n]);
      const flags = Tensor.from([true, false, true]);
      assert.equal(flags.dtype, 'bool');
      assert.deepEqual(await flags.toList(), [1, 0, 1]);
      const big = Tensor.from([1n, -2n]);
      assert.equal(big.dtype, 'int64');
    });

    it('handles scalars and empty tensors', async () => {
      const scalar = Tensor.from(new Float32Array([7]), []);
      assert.deepEqual(scalar.shape, []);
      assert.deepEqual(await scalar.toList(), [7]);
      const empty = Tensor.from(new Float32Array(0), [0, 5]);
      assert.deepEqual(empty.shape, [0, 5]);
      assert.equal((await empty.toArray()).length, 0);
    });

    it('casts with to(): float32 → float16 bits and bfloat16 bits', async () => {
      const t = Tensor.from(new Float32Array([1, -2, 0.5]));
      const half = await t.to({ dtype: 'float16' });
      assert.equal(half.dtype, 'float16');
      assert.deepEqual(Array.from((await half.toArray()) as Uint16Array), [0x3c00, 0xc000, 0x3800]);
      assert.deepEqual(await half.toList(), [1, -2, 0.5]);
      const bf = await t.to({ dtype: 'bfloat16' });
      assert.deepEqual(Array.from((await bf.toArray()) as Uint16Array), [0x3f80, 0xc000, 0x3f00]);
      assert.deepEqual(await bf.toList(), [1, -2, 0.5]);
      const back = await half.to({ dtype: 'float32' });
      assert.deepEqual(await back.toList(), [1, -2, 0.5]);
      const i64 = Tensor.from(new Float32Array([1.9, -1.9]), [2], { dtype: 'int64' });
      assert.deepEqual(await i64.toList(), [1n, -1n]);
      const same = await t.to('cpu');
      assert.deepEqual(await same.toList(), [1, -2, 0.5]);
    });
  });

  describe('bad input is a typed error', () => {
    it('shape whose element count differs from the data', () => {
      assert.throws(() => Tensor.from(new Float32Array(5), [2, 3]), (e: unknown) => {
        assert.ok(e instanceof ShapeError);
        assert.equal(e.code, 'ERR_BLIP2_SHAPE');
        assert.equal(e.argument, 'shape');
        assert.match(e.message, /\[2, 3\] \(6 elements\) but 'data' has 5 elements/);
        return true;
      });
    });

    it('malformed shapes', () => {
      for (const shape of [[-1], [1.5], ['2'], [NaN]]) {
        assert.throws(() => Tensor.from(new Float32Array(2), shape as never), (e: unknown) => {
          assert.ok(e instanceof InvalidArgumentError, String(e));
          assert.equal(e.argument, 'shape');
          return true;
        });
      }
      assert.throws(() => Tensor.from(new Float32Array(2), 2 as never), InvalidArgumentError);
    });

    it('ragged nested arrays and values that do not fit the dtype', () => {
      assert.throws(() => Tensor.from([[1, 2], [3]]), /nested arrays must be rectangular/);
      assert.throws(() => Tensor.from([1.5, 2], undefined, { dtype: 'int64' }), (e: unknown) => e instanceof DTypeError && /item 0 = 1.5/.test(e.message));
      assert.throws(() => Tensor.from(['a'] as never), DTypeError);
    });

    it('unknown dtypes and typed arrays without a dtype', () => {
      assert.throws(() => Tensor.from(new Float32Array(1), [1], { dtype: 'float8' as never }), (e: unknown) => {
        assert.ok(e instanceof InvalidArgumentError);
        assert.equal(e.argument, 'options.dtype');
        assert.match(e.message, /"float8"; expected one of float32/);
        return true;
      });
      assert.throws(() => Tensor.from(new Uint16Array(2)), (e: unknown) => e instanceof DTypeError && /float16' or 'bfloat16/.test(e.message));
      assert.throws(() => Tensor.from(new Uint32Array(2)), DTypeError);
      assert.throws(() => Tensor.from('abc' as never), InvalidArgumentError);
      assert.throws(() => Tensor.from(new DataView(new ArrayBuffer(4)) as never), InvalidArgumentError);
    });

    it('values an integer dtype cannot hold: a DTypeError naming the item and its value (no wrapping), then Tensor.from works on', async () => {
      const rejects = (make: () => unknown, index: number, value: string, message: RegExp): void => {
        assert.throws(make, (e: unknown) => {
          assert.ok(e instanceof DTypeError, String(e));
          assert.equal(e.code, 'ERR_BLIP2_DTYPE');
          assert.equal(e.argument, 'data');
          assert.equal(e.index, index);
          assert.equal(e.value, value);
          assert.match(e.message, message);
          return true;
        });
      };
      // JS arrays: exact integers within the range only.
      rejects(() => Tensor.from([300], [1], { dtype: 'int8' }), 0, '300', /item 0 = 300, which does not fit dtype 'int8' \(integers from -128 to 127\)/);
      rejects(() => Tensor.from([[1, 2], [3, 40000]], undefined, { dtype: 'int16' }), 3, '40000', /data\[1\]\[1\]/);
      rejects(() => Tensor.from([0, -1], undefined, { dtype: 'uint8' }), 1, '-1', /integers from 0 to 255/);
      rejects(() => Tensor.from([1, NaN], undefined, { dtype: 'int32' }), 1, 'NaN', /int32/);
      rejects(() => Tensor.from([2 ** 31], undefined, { dtype: 'int32' }), 0, '2147483648', /int32/);
      rejects(() => Tensor.from([0.5], undefined, { dtype: 'uint8' }), 0, '0.5', /uint8/);
      rejects(() => Tensor.from([Infinity], undefined, { dtype: 'int64' }), 0, 'Infinity', /int64/);
      rejects(() => Tensor.from([1n, 2n ** 63n], undefined, { dtype: 'int64' }), 1, '9223372036854775808n', /-2\^63 to 2\^63-1/);
      rejects(() => Tensor.from([200n], undefined, { dtype: 'int8' }), 0, '200n', /int8/);
      // Typed arrays cast as libtorch casts (fractions toward zero), but never wrap or invent values.
      rejects(() => Tensor.from(new Int32Array([1, 300]), [2], { dtype: 'int8' }), 1, '300', /int8/);
      rejects(() => Tensor.from(new Uint8Array([200]), [1], { dtype: 'int8' }), 0, '200', /int8/);
      rejects(() => Tensor.from(new Float32Array([1, NaN]), [2], { dtype: 'int32' }), 1, 'NaN', /int32/);
      rejects(() => Tensor.from(new Float64Array([1e20]), [1], { dtype: 'int64' }), 0, '100000000000000000000', /int64/);
      rejects(() => Tensor.from(new Float64Array([2 ** 63]), [1], { dtype: 'int64' }), 0, '9223372036854776000', /int64/);
      rejects(() => Tensor.from(new BigInt64Array([-129n]), [1], { dtype: 'int8' }), 0, '-129n', /int8/);
      const edge = Tensor.from([-128, 127], undefined, { dtype: 'int8' });
      assert.deepEqual(await edge.toList(), [-128, 127]);
      const cast = Tensor.from(new Float32Array([255.9, -0.5]), [2], { dtype: 'uint8' });
      assert.deepEqual(await cast.toList(), [255, 0]);
      const wide = Tensor.from(new Int8Array([-128, 127]), [2], { dtype: 'int64' });
      assert.deepEqual(await wide.toList(), [-128n, 127n]);
      const big = Tensor.from([-(2n ** 63n), 2n ** 63n - 1n]);
      assert.deepEqual(await big.toList(), [-(2n ** 63n), 2n ** 63n - 1n]);
      for (const t of [edge, cast, wide, big]) t.dispose();
    });

    it('typed arrays over a SharedArrayBuffer are copied (the addon cannot read shared memory)', async () => {
      const shared = new Float32Array(new SharedArrayBuffer(16));
      shared.set([1, 2, 3, 4]);
      const t = Tensor.from(shared, [2, 2]);
      shared[0] = 100; // the tensor holds its own copy
      assert.equal(t.dtype, 'float32');
      assert.deepEqual(await t.toList(), [1, 2, 3, 4]);
      const bytes = Buffer.from(new SharedArrayBuffer(3));
      bytes.set([7, 8, 9]);
      const u8 = Tensor.from(bytes.subarray(1));
      assert.equal(u8.dtype, 'uint8');
      assert.deepEqual(await u8.toList(), [8, 9]);
      const ids = Tensor.from(new BigInt64Array(new SharedArrayBuffer(16)).fill(5n), [2], { dtype: 'int32' });
      assert.deepEqual(await ids.toList(), [5, 5]);
      for (const x of [t, u8, ids]) x.dispose();
    });

    it('devices that do not exist or are unavailable', async () => {
      assert.throws(() => Tensor.from(new Float32Array(1), [1], { device: 'tpu' }), (e: unknown) => e instanceof DeviceError && e.argument === 'device');
      if (!cudaAvailable()) {
        // The message says which build this is: CPU-only (and how to get a CUDA one), or CUDA without a GPU.
        const expected = versions.builtWithCuda ? /no CUDA GPU or driver was found \(this addon is built with CUDA/ : /this addon is a CPU-only build .*BLIP2_PYTHON=/;
        assert.throws(() => Tensor.from(new Float32Array(1), [1], { device: 'cuda' }), (e: unknown) => e instanceof DeviceError && expected.test(e.message));
        await assert.rejects(Blip2ForConditionalGeneration.fromPretrained(path.join(__dirname, '..', 'models', 'tiny-random-opt'), { device: 'cuda' }),
          (e: unknown) => e instanceof DeviceError && expected.test(e.message));
      }
    });
  });

  describe('dispose', () => {
    it('double dispose is a no-op and use after dispose throws DisposedError', async () => {
      const t = Tensor.from(new Float32Array([1, 2]));
      t.dispose();
      t.dispose();
      assert.equal(t.disposed, true);
      assert.throws(() => t.toArray(), DisposedError);
      await assert.rejects(t.to('cpu'), DisposedError);
      assert.equal(String(t), 'Tensor(disposed)');
    });

    it('dispose frees native memory at once', async () => {
      await settleFinalizers();
      const before = liveTensorCount();
      const tensors = Array.from({ length: 50 }, () => Tensor.from(new Float32Array(1000)));
      assert.equal(liveTensorCount(), before + 50);
      tensors.forEach((t) => t.dispose());
      assert.equal(liveTensorCount(), before);
    });

    it('`using` disposes at the end of the scope', async () => {
      await settleFinalizers();
      const before = liveTensorCount();
      {
        const t = Tensor.from(new Float32Array(4));
        t[Symbol.dispose]();
      }
      assert.equal(liveTensorCount(), before);
    });

    it('a tensor in use by a running task stays valid after dispose()', async () => {
      const t = Tensor.from(new Float32Array([4, 5, 6]));
      const pending = t.to({ dtype: 'float64' });
      t.dispose();
      assert.deepEqual(await (await pending).toList(), [4, 5, 6]);
    });

    it('the finalizer frees tensors nobody disposed', async function () {
      if (!gcAvailable) this.skip();
      await settleFinalizers();
      const before = liveTensorCount();
      (() => {
        for (let i = 0; i < 200; i++) Tensor.from(new Float32Array(256));
      })();
      assert.ok(liveTensorCount() >= before + 1);
      await settleFinalizers();
      assert.ok(liveTensorCount() <= before + 5, `live tensors fell to ${liveTensorCount()} (was ${before} before)`);
    });
  });

  describe('runtime info', () => {
    it(`setNumThreads: at most os.availableParallelism() (${os.availableParallelism()} here); the count in effect is unchanged by a rejected call`, async () => {
      const cores = os.availableParallelism();
      const before = await getNumThreads();
      for (const threads of [1024, cores + 1, 0, 1.5, NaN]) {
        await assert.rejects(setNumThreads(threads), (e: unknown) => {
          assert.ok(e instanceof InvalidArgumentError, String(e));
          assert.equal(e.code, 'ERR_BLIP2_INVALID_ARGUMENT');
          assert.equal(e.argument, 'threads');
          assert.match(e.message, new RegExp(`expected an integer from 1 to ${cores} \\(os\\.availableParallelism\\(\\)\\)`));
          return true;
        });
      }
      assert.equal(await getNumThreads(), before);
      assert.equal(await setNumThreads(before), before);
      const t = Tensor.from(new Float32Array([1.5, -2]));
      const half = await t.to({ dtype: 'float16' });
      assert.deepEqual(await half.toList(), [1.5, -2]);
      t.dispose();
      half.dispose();
    });

    it('lists devices and versions', () => {
      assert.equal(devices()[0], 'cpu');
      assert.match(versions.libtorch, /^\d+\.\d+/);
      assert.match(versions.package, /^\d+\.\d+\.\d+/);
      assert.equal(cudaAvailable(), devices().some((d) => d.startsWith('cuda')));
      assert.equal(typeof stats().liveTensors, 'number');
    });
  });
});
