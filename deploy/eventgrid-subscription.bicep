// The Event Grid subscription that feeds ringrelay: Communication Services events to its webhook.
// The same resource as `ringrelay eventgrid subscription` prints (eventgrid-subscription.json is
// its ARM template with the defaults; tests/test_eventgrid_subscription.py checks the two agree).
// Deploy:  az deployment group create -g <group> --template-file deploy/eventgrid-subscription.bicep \
//            --parameters communicationServicesName=<acs> endpointUrl=https://<host>/api/events \
//                         webhookSecret=<RINGRELAY_WEBHOOK_SECRET>
// Property names: Microsoft.EventGrid eventSubscriptions 2022-06-15 (Azure/azure-rest-api-specs);
// ranges: learn.microsoft.com azure/event-grid/delivery-and-retry.

@description('The Communication Services resource (in this resource group) whose events go out')
param communicationServicesName string

@description('ringrelay\'s webhook URL, without the secret: https://<host>/api/events')
param endpointUrl string

@secure()
@description('RINGRELAY_WEBHOOK_SECRET, sent as ?code=; leave empty when only Entra ID is used')
param webhookSecret string = ''

@description('Subscription name: 3-64 characters of A-Z a-z 0-9 -')
@minLength(3)
@maxLength(64)
param subscriptionName string = 'ringrelay-incoming-call'

@description('Also deliver CallStarted, CallEnded, CallParticipantAdded, CallParticipantRemoved')
param includeCallLifecycle bool = false

@description('Also deliver the chat events (ChatMessageReceived, ...)')
param includeChat bool = false

// A ringing phone is not worth a late push: 2 attempts, 1 minute (azure-docs
// concepts/call-automation/incoming-call-notification.md recommends these for IncomingCall).
@minValue(1)
@maxValue(30)
param maxDeliveryAttempts int = 2

@minValue(1)
@maxValue(1440)
param eventTimeToLiveInMinutes int = 1

@minValue(1)
@maxValue(5000)
param maxEventsPerBatch int = 1

@minValue(1)
@maxValue(1024)
param preferredBatchSizeInKilobytes int = 64

@description('Entra ID delivery: the tenant of the app registration (RINGRELAY_EVENTGRID_TENANT_ID)')
param entraTenantId string = ''

@description('Entra ID delivery: the app id or URI (RINGRELAY_EVENTGRID_AUDIENCE)')
param entraAudience string = ''

@description('Advanced filters, e.g. from `ringrelay eventgrid filters` (at most 25)')
@maxLength(25)
param advancedFilters array = []

@description('Dead letters: a storage account resource id (optional)')
param deadLetterStorageId string = ''

@description('Dead letters: the blob container (with deadLetterStorageId)')
param deadLetterContainer string = ''

var incomingCall = ['Microsoft.Communication.IncomingCall']
var callLifecycle = [
  'Microsoft.Communication.CallStarted'
  'Microsoft.Communication.CallEnded'
  'Microsoft.Communication.CallParticipantAdded'
  'Microsoft.Communication.CallParticipantRemoved'
]
var chat = [
  'Microsoft.Communication.ChatMessageReceived'
  'Microsoft.Communication.ChatMessageReceivedInThread'
  'Microsoft.Communication.ChatThreadCreatedWithUser'
  'Microsoft.Communication.ChatParticipantAddedToThreadWithUser'
]
var eventTypes = concat(incomingCall, includeCallLifecycle ? callLifecycle : [], includeChat ? chat : [])
var endpoint = empty(webhookSecret) ? endpointUrl : '${endpointUrl}?code=${uriComponent(webhookSecret)}'
var entra = empty(entraTenantId) ? {} : {
  azureActiveDirectoryTenantId: entraTenantId
  azureActiveDirectoryApplicationIdOrUri: entraAudience
}

resource acs 'Microsoft.Communication/communicationServices@2023-04-01' existing = {
  name: communicationServicesName
}

resource subscription 'Microsoft.EventGrid/eventSubscriptions@2022-06-15' = {
  name: subscriptionName
  scope: acs
  properties: union({
    destination: {
      endpointType: 'WebHook'
      properties: union({
        endpointUrl: endpoint
        maxEventsPerBatch: maxEventsPerBatch
        preferredBatchSizeInKilobytes: preferredBatchSizeInKilobytes
      }, entra)
    }
    filter: union({
      includedEventTypes: eventTypes
    }, empty(advancedFilters) ? {} : { advancedFilters: advancedFilters })
    eventDeliverySchema: 'EventGridSchema'
    retryPolicy: {
      maxDeliveryAttempts: maxDeliveryAttempts
      eventTimeToLiveInMinutes: eventTimeToLiveInMinutes
    }
  }, empty(deadLetterStorageId) ? {} : {
    deadLetterDestination: {
      endpointType: 'StorageBlob'
      properties: {
        resourceId: deadLetterStorageId
        blobContainerName: deadLetterContainer
      }
    }
  })
}

output subscriptionId string = subscription.id
