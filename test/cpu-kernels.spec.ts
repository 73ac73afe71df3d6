import { strict as assert } from 'node:assert';

import { Blip2ForConditionalGeneration, Tensor, stats } from '../lib';
import { ids, rowsOf } from './support/fixtures';
import { smallModel } from './support/python';
import { referenceGreedy } from './support/reference';

describe('oneDNN for one-row CPU products (native/core/graph_passes)', () => {
  let modelDir: string;
  before(() => {
    modelDir = smallModel();
  });

  function pixels(): Tensor {
    const data = new Float32Array(3 * 56 * 56).map((_, i) => Math.sin(i * 0.37));
    return Tensor.from(data, [1, 3, 56, 56]);
  }

  it('rewrites the language model linears at load, and generates what the BLAS path and a forward()-only decoder generate', async () => {
    const before = stats().oneDnnLinears;
    const model = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
    // decode and forward_cached: 2 layers x 6 linears + the LM head, each.
    assert.equal(stats().oneDnnLinears - before, 26);
    process.env.BLIP2_NO_ONEDNN = '1';
    const blas = await Blip2ForConditionalGeneration.fromPretrained(modelDir);
    delete process.env.BLIP2_NO_ONEDNN;
    assert.equal(stats().oneDnnLinears - before, 26, 'BLIP2_NO_ONEDNN=1 keeps BLAS');

    const prompt = [...Array(8).fill(model.manifest.image_token_index), 2, 40, 41, 42];
    const [viaOneDnn] = await rowsOf(await model.generate({ pixelValues: pixels(), inputIds: ids([prompt]) }, { maxNewTokens: 16, eosTokenId: [] }));
    const [viaBlas] = await rowsOf(await blas.generate({ pixelValues: pixels(), inputIds: ids([prompt]) }, { maxNewTokens: 16, eosTokenId: [] }));
    const reference = await referenceGreedy(model, pixels(), prompt, 16);
    assert.deepEqual(viaOneDnn.slice(prompt.length), reference);
    assert.deepEqual(viaBlas.slice(prompt.length), reference);
    // Batched steps (several rows) take the BLAS branch of the same rewritten graph.
    const two = Tensor.from(new Float32Array(2 * 3 * 56 * 56).map((_, i) => Math.sin((i % (3 * 56 * 56)) * 0.37)), [2, 3, 56, 56]);
    const rows = await rowsOf(await model.generate({ pixelValues: two, inputIds: ids([prompt, prompt]) }, { maxNewTokens: 16, eosTokenId: [] }));
    assert.deepEqual(rows[0], viaOneDnn);
    assert.deepEqual(rows[1], viaOneDnn);
    model.dispose();
    blas.dispose();
  });
});
