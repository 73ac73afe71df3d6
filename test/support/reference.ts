import { Blip2ForConditionalGeneration, Tensor } from '../../lib';
import { ids } from './fixtures';

/** Greedy decoding by re-running forward() on the whole sequence each step: an independent check of the cached loop. */
export async function referenceGreedy(
  model: Blip2ForConditionalGeneration,
  pixelValues: Tensor,
  prompt: number[],
  steps: number,
  { repetitionPenalty = 1, eos = [] as number[] } = {},
): Promise<number[]> {
  const out: number[] = [];
  for (let s = 0; s < steps; s++) {
    const sequence = [...prompt, ...out];
    const { logits } = await model.forward({ pixelValues, inputIds: ids([sequence]) });
    const all = await logits.toArray();
    const vocab = logits.shape[2];
    const last = Array.from(all.subarray((sequence.length - 1) * vocab, sequence.length * vocab));
    if (repetitionPenalty !== 1) {
      for (const token of new Set(sequence)) last[token] = last[token] < 0 ? last[token] * repetitionPenalty : last[token] / repetitionPenalty;
    }
    let best = 0;
    for (let v = 1; v < vocab; v++) if (last[v] > last[best]) best = v;
    out.push(best);
    if (eos.includes(best)) break;
  }
  return out;
}

