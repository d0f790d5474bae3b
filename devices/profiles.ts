/**
 * Profiles of real devices and typical links, as data, each number with its source. Where no published measurement of
 * exactly that quantity was found, the figure is an estimate and the comment says how it was derived. Figures are for
 * CPU inference (edgeshard runs onnxruntime's CPU kernels; GPUs and NPUs are not used).
 *
 * Derived rates: llama.cpp decode tokens/s × model bytes = weight bytes read per second (decode is memory bound,
 * every weight is read once per token). TinyLlama-1.1B Q8_0 is 1.17 GB (1.1e9 weights × 34/32 bytes).
 * Measure your own devices with `edgeshard profile`; these profiles are for planning before you have them.
 */
import type { DeviceCapabilities, LinkCapabilities } from './capabilities.ts'

/** Names of the typical links in {@link TYPICAL_LINKS}. */
export type LinkKind = 'gbe' | 'wifi5' | 'wifi6'

/**
 * Typical device-to-device links as the application sees them (TCP payload through edgeshard's libp2p stack).
 * Wi-Fi figures assume both devices are wireless clients of one access point: every byte crosses the air twice, which
 * halves the throughput a single client reaches against a wired host (thornelabs.net, "wireless laptop to wireless
 * laptop real-world throughput"). Measure real links with the link probe (agent/link-probe.ts).
 */
export const TYPICAL_LINKS: Readonly<Record<LinkKind, LinkCapabilities>> = {
  gbe: {
    // Estimate: ping across a switched gigabit LAN is 0.1–0.3 ms; libp2p noise + yamux adds 0.1–0.5 ms per round
    // trip (../shared/NOTES.md, loopback table: 0.57 ms median for a 32 KiB message, plaintext 0.14 ms).
    rttMs: 0.5,
    // iperf3 between a Raspberry Pi and a PC through a gigabit switch: 941 Mbit/s, mean of five runs
    // (mpr-projects.com, "RPi NAS part 3: network connections", 2024).
    mbps: 940,
  },
  wifi5: {
    // Estimate: Wi-Fi adds 1–5 ms of round trip over a cable (CSMA/CA waits for a free channel, retries; varies with
    // load and distance), plus the libp2p overhead above.
    rttMs: 3,
    // 2×2 Wi-Fi 5 clients next to a Wi-Fi 5 AP: 513–528 Mbit/s (gameandtechfocus.com, "Is WiFi 6 worth it? Part II");
    // halved for a wireless-to-wireless path (see above): ≈ 250 Mbit/s.
    mbps: 250,
  },
  wifi6: {
    // Estimate: as Wi-Fi 5, somewhat lower under load (OFDMA schedules clients instead of contending).
    rttMs: 2,
    // A 2×2 Wi-Fi 6 client (iPhone 11 Pro) on a Wi-Fi 6 AP: 474 Mbit/s (gameandtechfocus.com, same test); an Intel AX200
    // on a Raspberry Pi CM4: 838 Mbit/s (Jeff Geerling, geerlingguy/raspberry-pi-pcie-devices#38); ≈ 800 halved: 400.
    mbps: 400,
  },
}

/** A real device: its capabilities, what it is, and which typical links it has built in. */
export interface KnownDeviceProfile {
  /** Profile name as cluster files spell it, e.g. `raspberry-pi-4b`. */
  readonly name: string
  /** What exactly was profiled (board, memory size, CPU). */
  readonly description: string
  readonly capabilities: DeviceCapabilities
  /** Links the device has without adapters, best first. */
  readonly links: readonly LinkKind[]
}

const GiB = 2 ** 30

/** Known device profiles by name. */
export const DEVICE_PROFILES: Readonly<Record<string, KnownDeviceProfile>> = {
  'raspberry-pi-4b': {
    name: 'raspberry-pi-4b',
    description: 'Raspberry Pi 4 Model B, 4 GB LPDDR4-3200, 4× Cortex-A72 at 1.5 GHz, microSD',
    capabilities: {
      // Raspberry Pi 4 product brief: 1, 2, 4 or 8 GB LPDDR4-3200; this profile is the 4 GB board.
      memoryBytes: 4 * GiB,
      // Product brief: quad-core Cortex-A72 (ARM v8) 64-bit SoC at 1.5 GHz (1.8 GHz on boards from 2020).
      cores: 4,
      // TinyLlama-1.1B Q8_0 decodes at 3 tokens/s on a Pi 4 with llama.cpp (justine.lol/matmul, "LLaMA Now Goes Faster
      // on CPUs", 2024): 3 × 1.17 GB = 3.5 GB/s. Cross-check: STREAM copy 5.5 GB/s (sci-pi.org.uk/bench/stream.html).
      decodeGBs: 3.5,
      // Estimate: HPL reaches about 8 GFLOP/s in FP64 on a Pi 4 (feiereisen.net, "Linpack on the Raspberry Pi 4",
      // 2022); FP32 NEON doubles the lanes: ≈ 16. (llama.cpp's int8 Q8_0 prompt rate, 10 tokens/s ≈ 22 GFLOP/s, is
      // an upper bound.)
      prefillGflops: 16,
      // microSD: 43.9 MB/s hdparm buffered reads with the fastest cards (pidramble.com microSD benchmarks, Pi 4);
      // the card interface (DDR50), not the card, is the limit.
      diskReadMBs: 44,
    },
    // Product brief: Gigabit Ethernet, 2.4/5 GHz 802.11ac.
    links: ['gbe', 'wifi5'],
  },
  'raspberry-pi-5': {
    name: 'raspberry-pi-5',
    description: 'Raspberry Pi 5, 8 GB LPDDR4X-4267, 4× Cortex-A76 at 2.4 GHz, microSD (SDR104)',
    capabilities: {
      // Raspberry Pi 5 product brief: 4 or 8 GB LPDDR4X-4267 (later 2 and 16 GB); this profile is the 8 GB board.
      memoryBytes: 8 * GiB,
      // Product brief: quad-core Cortex-A76 at 2.4 GHz.
      cores: 4,
      // TinyLlama-1.1B Q8_0 decodes at 9 tokens/s on a Pi 5 (justine.lol/matmul, llamafile 0.7 and llama.cpp
      // 2024-03-26): 9 × 1.17 GB = 10.5 GB/s.
      decodeGBs: 10.5,
      // Estimate: 4 × A76 at 2.4 GHz with two 128-bit FMA pipes = 154 GFLOP/s FP32 peak; ~40 % in an f32 GEMM ≈ 60.
      // (llama.cpp's int8 Q8_0 prompt rate on a Pi 5, 35–45 tokens/s ≈ 77–99 GFLOP/s, same source, is higher.)
      prefillGflops: 60,
      // microSD in SDR104 mode: about 90–100 MB/s sequential (Jeff Geerling's Pi 5 card-reader tests, as cited in
      // zhonguncle.github.io "Performance record of Raspberry Pi 4B"); an NVMe HAT reaches ~400–800 MB/s.
      diskReadMBs: 90,
    },
    // Product brief: Gigabit Ethernet, dual-band 802.11ac.
    links: ['gbe', 'wifi5'],
  },
  'jetson-nano': {
    name: 'jetson-nano',
    description: 'NVIDIA Jetson Nano developer kit, 4 GB LPDDR4, 4× Cortex-A57 at 1.43 GHz, microSD (CPU only)',
    capabilities: {
      // Jetson Nano data sheet DA-09366-001: 4 GB LPDDR4 (4 ch × 16-bit at 1600 MHz, 25.6 GB/s peak).
      memoryBytes: 4 * GiB,
      // Data sheet: quad-core ARM Cortex-A57 MPCore, 1.43 GHz.
      cores: 4,
      // Estimate: sbc-bench memcpy 3680 MB/s on a Jetson Nano at 1430 MHz (ThomasKaiser/sbc-bench results), times the
      // Pi 4's ratio of llama.cpp decode rate to sbc-bench memcpy (3.5 GB/s / 2.46 GB/s = 1.4): ≈ 5 GB/s.
      decodeGBs: 5,
      // Estimate: 4 × A57 at 1.43 GHz × 8 FP32 FLOP/cycle = 46 GFLOP/s peak; ~30 % in an f32 GEMM ≈ 13.
      prefillGflops: 13,
      // Estimate: the developer kit boots from microSD over a UHS-I SDR104 bus (104 MB/s at most); ~80 MB/s with a
      // fast card.
      diskReadMBs: 80,
    },
    // Developer kit: Gigabit Ethernet, no Wi-Fi without an M.2 card or USB adapter.
    links: ['gbe'],
  },
  'jetson-orin-nano': {
    name: 'jetson-orin-nano',
    description: 'NVIDIA Jetson Orin Nano 8 GB developer kit, 128-bit LPDDR5, 6× Cortex-A78AE at 1.5 GHz, NVMe (CPU only)',
    capabilities: {
      // Jetson Orin Nano series data sheet: 8 GB 128-bit LPDDR5, 68 GB/s (102 GB/s with JetPack 6.1 "Super" clocks).
      memoryBytes: 8 * GiB,
      // Data sheet: six-core Arm Cortex-A78AE v8.2 (1.5 GHz; 1.7 GHz "Super").
      cores: 6,
      // Estimate: sbc-bench memcpy 10600 MB/s on the Jetson AGX Orin (same A78AE CPU complex; ThomasKaiser/sbc-bench
      // results) × 1.4 (the Pi 4's decode/memcpy ratio, see jetson-nano) ≈ 15 GB/s for the CPU; the 68 GB/s DRAM peak
      // is shared with the GPU and not reachable from the CPU cores alone.
      decodeGBs: 15,
      // Estimate: 6 × A78AE at 1.5 GHz × 16 FP32 FLOP/cycle = 144 GFLOP/s peak; ~40 % ≈ 58.
      prefillGflops: 58,
      // Estimate: NVMe SSD in the developer kit's PCIe Gen3 ×4 M.2 slot (data sheet: 1 ×4 Gen3); typical Gen3 SSDs read
      // 2–3.5 GB/s sequentially.
      diskReadMBs: 2000,
    },
    // Developer kit: Gigabit Ethernet, 802.11ac M.2 Wi-Fi module.
    links: ['gbe', 'wifi5'],
  },
  'android-snapdragon-7': {
    name: 'android-snapdragon-7',
    description: 'Mid-range Android phone, Snapdragon 7+ Gen 2 class (1× X2, 3× A710, 4× A510), 8 GB LPDDR5, UFS 3.1',
    capabilities: {
      // A common configuration of Snapdragon 7-series phones (e.g. 8/12/16 GB variants); Android keeps a large part.
      memoryBytes: 8 * GiB,
      // Qualcomm Snapdragon 7+ Gen 2 (sm7475): 1× Cortex-X2 2.91 GHz, 3× A710 2.49 GHz, 4× A510 1.8 GHz
      // (xda-developers.com, Snapdragon 7+ Gen 2 specifications, 2023).
      cores: 8,
      // llama2.c run.c -Ofast decodes stories15M (15.2 M params f32 = 61 MB) at 302 tokens/s on a Xiaomi phone reported
      // as "Snapdragon 7 Gen 2, 2.4 GHz" (karpathy/llama2.c#34): 18 GB/s on one thread; estimate 15 GB/s sustained
      // (phones throttle under load). LPDDR5-6400 64-bit peak: 51.2 GB/s.
      decodeGBs: 15,
      // Estimate: X2 + 3× A710 at ~2.5–2.9 GHz × 16 FP32 FLOP/cycle ≈ 166 GFLOP/s peak on the big cores; ~30 %
      // sustained in a phone ≈ 50.
      prefillGflops: 50,
      // Estimate: UFS 3.1 sequential reads reach ~1.5–2.1 GB/s.
      diskReadMBs: 1500,
    },
    // Snapdragon FastConnect 6900: Wi-Fi 6/6E (xda-developers.com, same source).
    links: ['wifi6'],
  },
  laptop: {
    name: 'laptop',
    description: 'Laptop: MacBook Air M1, 16 GB LPDDR4X-4266 (68.2 GB/s), 4 performance + 4 efficiency cores, NVMe',
    capabilities: {
      // Apple MacBook Air (M1, 2020) configured with 16 GB unified memory.
      memoryBytes: 16 * GiB,
      // Apple M1: 8 CPU cores (4 performance, 4 efficiency).
      cores: 8,
      // llama.cpp CPU decode on an M1 reaches ≥ 53.3 GB/s of the 68.2 GB/s physical limit (ggml-org/llama.cpp#1642,
      // philipturner's bandwidth table).
      decodeGBs: 53,
      // Estimate: 4 performance cores at 3.2 GHz × 4 × 128-bit FMA (32 FP32 FLOP/cycle) ≈ 410 GFLOP/s NEON peak;
      // ~50 % in an f32 GEMM ≈ 200.
      prefillGflops: 200,
      // Estimate: Apple's internal NVMe SSDs read 2.5–3 GB/s sequentially (smaller capacities are slower).
      diskReadMBs: 2500,
    },
    // 802.11ax Wi-Fi 6; Ethernet through a USB-C adapter.
    links: ['wifi6', 'gbe'],
  },
}

/** Names of the known profiles, in a stable order. */
export const DEVICE_PROFILE_NAMES: readonly string[] = Object.keys(DEVICE_PROFILES)

/** The known profile `name`, or undefined. */
export function knownDeviceProfile(name: string): KnownDeviceProfile | undefined {
  return Object.hasOwn(DEVICE_PROFILES, name) ? DEVICE_PROFILES[name] : undefined
}
