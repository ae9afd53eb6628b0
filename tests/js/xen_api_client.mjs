// Drives the server with Xen Orchestra's XenAPI connector (`xen-api`) as Xen Orchestra does,
// and reads a delta export with `vhd-lib`'s parseVhdStream. Prints one JSON object of
// findings on stdout; tests/test_xen_api_js.py checks them.
//
// usage: node xen_api_client.mjs URL PASSWORD
import { createHash, randomBytes } from 'node:crypto'
import { createRequire } from 'node:module'

import { createClient } from 'xen-api'

const require = createRequire(import.meta.url)
const { parseVhdStream } = require('vhd-lib/parseVhdStream.js')

const [url, password] = process.argv.slice(2)
const MiB = 1 << 20
const sha256 = buffer => createHash('sha256').update(buffer).digest('hex')
const findings = {}

async function readAll(stream) {
  const chunks = []
  for await (const chunk of stream) chunks.push(chunk)
  return Buffer.concat(chunks)
}

// XAPI's chunk framing: [u64 LE offset][u32 LE length][data]..., then 12 zero bytes.
function framed(writes) {
  const parts = []
  for (const [offset, data] of writes) {
    const head = Buffer.alloc(12)
    head.writeBigUInt64LE(BigInt(offset), 0)
    head.writeUInt32LE(data.length, 8)
    parts.push(head, data)
  }
  parts.push(Buffer.alloc(12))
  return Buffer.concat(parts)
}

const xapi = createClient({ url, auth: { user: 'admin', password }, allowUnauthorized: true })
await xapi.connect()
await xapi.objectsFetched
findings.connected = xapi.status
findings.poolSr = xapi.pool.default_SR

// A VHD VDI, created through the RPC, then looked up as XO does.
const size = 8 * MiB
const vdiRef = await xapi.call('VDI.create', {
  SR: xapi.pool.default_SR,
  name_label: 'xen-api test',
  name_description: '',
  virtual_size: size,
  type: 'user',
  sharable: false,
  read_only: false,
  other_config: {},
  sm_config: { 'image-format': 'vhd' },
})
const record = await xapi.getRecord('VDI', vdiRef)
findings.record = {
  type: record.$type,
  ref: record.$ref === vdiRef,
  virtual_size: record.virtual_size,
  SR: record.SR === xapi.pool.default_SR,
  image_format: record.sm_config['image-format'],
}
findings.byUuid = (await xapi.call('VDI.get_by_uuid', record.uuid)) === vdiRef

// putResource of a raw disk under a task; the task's result is the VDI.
const disk = randomBytes(size)
findings.putResult = await xapi.putResource(disk, '/import_raw_vdi/', {
  query: { format: 'raw', vdi: vdiRef },
  task: true,
})
findings.putResultIsVdi = findings.putResult === vdiRef

// getResource of its export under a task.
const exported = await xapi.getResource('/export_raw_vdi/', {
  query: { format: 'raw', vdi: vdiRef },
  task: true,
})
findings.exportSame = sha256(await readAll(exported.body)) === sha256(disk)
findings.exportTask = await exported.task

// Two snapshots with changes between them, and the VHD delta of the second against the first.
const before = await xapi.callAsync('VDI.snapshot', vdiRef, {})
const changes = [
  [2 * MiB + 64 * 1024, randomBytes(4096)], // in block 1: 8 sectors
  [6 * MiB, randomBytes(MiB)], // in block 3: the first half
]
await xapi.putResource(framed(changes), '/import_raw_vdi/', {
  query: { format: 'raw', chunked: 'true', vdi: vdiRef },
  task: true,
})
const after = await xapi.callAsync('VDI.snapshot', vdiRef, {})
const beforeUuid = (await xapi.getRecord('VDI', before)).uuid
const delta = await xapi.getResource('/export_raw_vdi/', {
  query: { format: 'vhd', vdi: after, base: before },
  task: true,
})
const expected = Buffer.from(disk)
for (const [offset, data] of changes) data.copy(expected, offset)
const blocks = []
let sectorsSet = 0
let blocksMatch = true
for await (const item of parseVhdStream(delta.body)) {
  if (item.type === 'footer') findings.diskType = item.footer.diskType
  if (item.type === 'header') {
    findings.parentUuid = Buffer.from(item.header.parentUuid).toString('hex')
    findings.blockSize = item.header.blockSize
  }
  if (item.type !== 'block') continue
  blocks.push(item.id)
  const blockSize = item.data.length
  for (let sector = 0; sector < blockSize / 512; sector++) {
    if (!(item.bitmap[sector >> 3] & (0x80 >> (sector & 7)))) continue
    sectorsSet++
    const at = item.id * blockSize + sector * 512
    const got = item.data.subarray(sector * 512, sector * 512 + 512)
    if (!got.equals(expected.subarray(at, at + 512))) blocksMatch = false
  }
}
await delta.task
findings.deltaBlocks = blocks
findings.deltaSectors = sectorsSet
findings.deltaMatches = blocksMatch
findings.baseUuid = beforeUuid.replaceAll('-', '')
await xapi.disconnect()

// A bad login is refused with XAPI's code.
const intruder = createClient({ url, auth: { user: 'admin', password: 'wrong' }, watchEvents: false })
try {
  await intruder.connect()
  findings.badLogin = 'accepted'
} catch (error) {
  findings.badLogin = error.code
}

process.stdout.write(JSON.stringify(findings) + '\n')
process.exit(0)
