// Sends events to analyticsd's Segment endpoints with @segment/analytics-node, as an app would, and
// prints what was delivered as JSON: {"delivered":[{"messageId","type","event"}],"errors":[...]}.
// ANALYTICSD_URL is the server's base URL, WRITE_KEY an API key with events:write, COUNT the number
// of track calls (identify, page, screen, group and alias are sent once each besides).
'use strict'
const { Analytics } = require('@segment/analytics-node')

const host = process.env.ANALYTICSD_URL
const writeKey = process.env.WRITE_KEY
const count = Number(process.env.COUNT || '50')
if (!host || !writeKey) {
  console.error('set ANALYTICSD_URL and WRITE_KEY')
  process.exit(2)
}

const analytics = new Analytics({ writeKey, host, flushAt: 20, flushInterval: 200, maxRetries: 3 })
const delivered = []
const errors = []
analytics.on('error', (err) => errors.push(String(err && (err.reason || err.message || err))))

const done = (type, event) => (err, ctx) => {
  if (err) {
    errors.push(`${type}: ${err.message || err}`)
    return
  }
  delivered.push({ messageId: ctx.event.messageId, type, event: event || '' })
}

for (let i = 0; i < count; i++) {
  const event = i % 2 ? 'Order Completed' : 'Product Viewed'
  analytics.track({ userId: `node-user-${i % 7}`, event, properties: { i, revenue: i * 1.5 } }, done('track', event))
}
analytics.identify({ userId: 'node-user-1', traits: { plan: 'pro' } }, done('identify'))
analytics.page({ anonymousId: 'node-anon-1', name: 'Pricing', properties: { path: '/pricing' } }, done('page'))
analytics.screen({ userId: 'node-user-2', name: 'Settings' }, done('screen'))
analytics.group({ userId: 'node-user-3', groupId: 'acme', traits: { seats: 5 } }, done('group'))
analytics.alias({ userId: 'node-user-4', previousId: 'node-anon-4' }, done('alias'))

analytics.closeAndFlush({ timeout: 30000 }).then(() => {
  process.stdout.write(JSON.stringify({ delivered, errors }) + '\n')
})
