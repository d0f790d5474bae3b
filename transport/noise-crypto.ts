/**
 * Noise crypto for @chainsafe/libp2p-noise on node:crypto only (OpenSSL): ChaCha20-Poly1305 (RFC 8439), X25519
 * (RFC 7748), SHA-256 and HKDF-SHA256 (RFC 5869) — the primitives of `Noise_XX_25519_ChaChaPoly_SHA256` that the
 * libp2p noise spec fixes, so it interoperates with any libp2p noise peer (Noise spec §12, libp2p noise spec).
 *
 * Why not the library's default: on Node it uses AssemblyScript ChaCha20-Poly1305 (≈ 120 MB/s) below 1200 bytes and
 * OpenSSL above, but passes the raw key on every message, and Node 24 (OpenSSL 3) then builds a key object per call:
 * ≈ 13 µs of a ≈ 15 µs small-message encryption. Here each 32-byte key is imported once (`createSecretKey`) and
 * cached by the key's bytes, so a message costs ≈ 4 µs plus ≈ 1 ns/byte.
 * Outputs are lists of the cipher's own buffers (no concatenation copy); decryption fails closed (throws) on a bad tag.
 */
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createPrivateKey,
  createPublicKey,
  createSecretKey,
  diffieHellman,
  generateKeyPairSync,
  hkdfSync,
  type KeyObject,
  timingSafeEqual,
} from 'node:crypto'
import type { ICryptoInterface } from '@chainsafe/libp2p-noise'
import { Uint8ArrayList } from 'uint8arraylist'

const CHACHA_POLY = 'chacha20-poly1305'
const TAG_BYTES = 16
const KEY_BYTES = 32
/** DER prefix of a PKCS#8 X25519 private key (RFC 8410 §7), followed by the 32 raw key bytes. */
const PKCS8_X25519_PREFIX = Buffer.from([
  0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20,
])
/** DER prefix of an SPKI X25519 public key (RFC 8410 §4), followed by the 32 raw key bytes. */
const SPKI_X25519_PREFIX = Buffer.from([0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00])

/**
 * Bytes as noise passes them: an array or a `Uint8ArrayList` of the noise package's own uint8arraylist (2.x).
 * Lists returned here are 3.x; both majors recognise each other's lists (`Symbol.for('@achingbrain/uint8arraylist')`
 * and the same `bufs` field), which the interop tests exercise.
 */
type Bytes = Parameters<ICryptoInterface['hashSHA256']>[0]
type NoiseOutput = ReturnType<ICryptoInterface['chaCha20Poly1305Encrypt']>

function asNoiseOutput(list: Uint8ArrayList): NoiseOutput {
  return list as unknown as NoiseOutput
}

/**
 * Imported ChaCha20 keys by the array noise passes (a CipherState keeps one array per key). The bytes are kept and
 * compared on every use, so an array whose contents changed is re-imported, never used with a stale key.
 */
const keyCache = new WeakMap<Uint8Array, { bytes: Buffer; key: KeyObject }>()

function secretKey(k: Uint8Array): KeyObject {
  if (k.byteLength !== KEY_BYTES) throw new RangeError(`ChaCha20-Poly1305 key is ${k.byteLength} bytes, must be 32`)
  const cached = keyCache.get(k)
  if (cached !== undefined && timingSafeEqual(cached.bytes, k)) return cached.key
  const bytes = Buffer.from(k) // a copy: `k` may change later
  const key = createSecretKey(bytes)
  keyCache.set(k, { bytes, key })
  return key
}

function contiguous(data: Bytes): Uint8Array {
  return data instanceof Uint8Array ? data : data.subarray()
}

/** Raw 32 bytes of a DER key that ends with them. */
function lastKeyBytes(der: Buffer): Uint8Array {
  return new Uint8Array(der.buffer, der.byteOffset + der.byteLength - KEY_BYTES, KEY_BYTES)
}

/**
 * `ICryptoInterface` of @chainsafe/libp2p-noise backed by node:crypto. Pass as `noise({ crypto: nodeNoiseCrypto })`.
 * @throws from `chaCha20Poly1305Decrypt` when the tag does not verify (tampered or wrong key): noise then aborts the
 *   connection
 */
export const nodeNoiseCrypto: ICryptoInterface = {
  hashSHA256(data: Bytes): Uint8Array {
    const hash = createHash('sha256')
    if (data instanceof Uint8Array) hash.update(data)
    else for (const part of data) hash.update(part)
    return hash.digest()
  },

  getHKDF(ck: Uint8Array, ikm: Uint8Array): [Uint8Array, Uint8Array, Uint8Array] {
    // Noise HKDF(ck, ikm) = HKDF-SHA256 with salt ck, empty info, three 32-byte outputs (Noise spec §4.3)
    const okm = new Uint8Array(hkdfSync('sha256', ikm, ck, new Uint8Array(0), 3 * KEY_BYTES))
    return [okm.subarray(0, 32), okm.subarray(32, 64), okm.subarray(64, 96)]
  },

  generateX25519KeyPair() {
    const { publicKey, privateKey } = generateKeyPairSync('x25519', {
      publicKeyEncoding: { type: 'spki', format: 'der' },
      privateKeyEncoding: { type: 'pkcs8', format: 'der' },
    })
    return { publicKey: lastKeyBytes(publicKey), privateKey: lastKeyBytes(privateKey) }
  },

  generateX25519KeyPairFromSeed(seed: Uint8Array) {
    const privateKey = createPrivateKey({ key: Buffer.concat([PKCS8_X25519_PREFIX, seed]), format: 'der', type: 'pkcs8' })
    const publicKey = createPublicKey(privateKey).export({ type: 'spki', format: 'der' })
    return { publicKey: lastKeyBytes(publicKey), privateKey: seed }
  },

  generateX25519SharedKey(privateKey: Bytes, publicKey: Bytes): Uint8Array {
    return diffieHellman({
      privateKey: createPrivateKey({
        key: Buffer.concat([PKCS8_X25519_PREFIX, contiguous(privateKey)]),
        format: 'der',
        type: 'pkcs8',
      }),
      publicKey: createPublicKey({
        key: Buffer.concat([SPKI_X25519_PREFIX, contiguous(publicKey)]),
        format: 'der',
        type: 'spki',
      }),
    })
  },

  chaCha20Poly1305Encrypt(plaintext: Bytes, nonce: Uint8Array, ad: Uint8Array, k: Uint8Array): NoiseOutput {
    const cipher = createCipheriv(CHACHA_POLY, secretKey(k), nonce, { authTagLength: TAG_BYTES })
    if (ad.byteLength > 0) cipher.setAAD(ad, { plaintextLength: plaintext.byteLength })
    const out = new Uint8ArrayList()
    if (plaintext instanceof Uint8Array) out.append(cipher.update(plaintext))
    else for (const part of plaintext) out.append(cipher.update(part))
    const last = cipher.final() // empty for a stream cipher, kept for completeness
    if (last.byteLength > 0) out.append(last)
    out.append(cipher.getAuthTag())
    return asNoiseOutput(out)
  },

  chaCha20Poly1305Decrypt(ciphertext: Bytes, nonce: Uint8Array, ad: Uint8Array, k: Uint8Array): NoiseOutput {
    const textBytes = ciphertext.byteLength - TAG_BYTES
    if (textBytes < 0) throw new RangeError(`ciphertext of ${ciphertext.byteLength} bytes is shorter than its tag`)
    const decipher = createDecipheriv(CHACHA_POLY, secretKey(k), nonce, { authTagLength: TAG_BYTES })
    if (ad.byteLength > 0) decipher.setAAD(ad, { plaintextLength: textBytes })
    decipher.setAuthTag(ciphertext.subarray(textBytes))
    if (ciphertext instanceof Uint8Array) {
      const text = decipher.update(ciphertext.subarray(0, textBytes))
      decipher.final() // throws when the tag does not verify
      return text
    }
    const out = new Uint8ArrayList()
    for (const part of ciphertext.sublist(0, textBytes)) out.append(decipher.update(part))
    decipher.final()
    return asNoiseOutput(out)
  },
}
