const gc = (globalThis as { gc?: () => void }).gc;

export const gcAvailable = gc !== undefined;

/** Collects garbage and lets the finalizers of wrapped objects run (they run from the event loop). */
export async function settleFinalizers(): Promise<void> {
  for (let i = 0; i < 4; i++) {
    gc?.();
    await new Promise((resolve) => setImmediate(resolve));
  }
}
